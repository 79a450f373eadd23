"""One enclave site: the encrypted dataset vault, the base model store, the container runtime,
the file-level access ledger, the release gate and release signing. :mod:`enclave.agent` ties
them together behind the gateway's :class:`enclave.contract.Site` contract."""
