"""What an owner signs, byte for byte: an approval or denial of one binding, and a policy text.

The owner signs in their own client with their own key (the ECDSA P-256 key of their CA-issued
identity); the gateway relays and stores the signatures; a site checks them before it releases
a data key (:mod:`enclave.sovereignty`), so a gateway that forges, replays or alters a decision
is refused there. Each message starts with its own context line, so a signature made for one
kind of statement is never valid for another.
"""

from __future__ import annotations

import hashlib

APPROVAL_CONTEXT = b"sealroom approval v1\n"
POLICY_CONTEXT = b"sealroom policy v1\n"


def approval_message(binding_digest: str, decision: str) -> bytes:
    """An owner's ``decision`` ("approve" or "deny") of the job whose binding has this digest
    (the binding names the job, its spec, bundle, dataset versions and policy versions)."""
    if decision not in ("approve", "deny"):
        raise ValueError(f"decision must be approve or deny, not {decision!r}")
    return APPROVAL_CONTEXT + f"{binding_digest}\n{decision}".encode()


def policy_message(dataset: str, text: str) -> bytes:
    """An owner's policy text for ``dataset`` (by its SHA-256: the text is what is stored)."""
    return POLICY_CONTEXT + f"{dataset}\n{hashlib.sha256(text.encode()).hexdigest()}".encode()
