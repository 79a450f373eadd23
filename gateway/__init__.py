"""The control plane: authentication and authorisation, the job lifecycle, policy decisions,
approvals, dispatch to sites, the release store and the audit log.

Plain modules hold the logic (:mod:`gateway.core`, :mod:`gateway.store`, :mod:`enclave.audit`;
the state machine is :mod:`policies.lifecycle`, the site contract :mod:`enclave.contract`); the
gRPC layer (:mod:`gateway.server`, ``_servicer``, ``_auth``) is a thin shell around them;
:mod:`gateway.client` is the SDK and :mod:`gateway.cli` the ``sealroom`` command.
"""
