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
POLICY_CONTEXT = b"sealroom policy v2\n"


def approval_message(binding_digest: str, decision: str) -> bytes:
    """An owner's ``decision`` ("approve" or "deny") of the job whose binding has this digest
    (the binding names the job, its spec, bundle, dataset versions and policy versions)."""
    if decision not in ("approve", "deny"):
        raise ValueError(f"decision must be approve or deny, not {decision!r}")
    return APPROVAL_CONTEXT + f"{binding_digest}\n{decision}".encode()


def policy_message(dataset: str, version: int, text: str) -> bytes:
    """An owner's policy text for ``dataset`` as its version ``version`` (the text by its
    SHA-256: the text is what is stored). The version is signed so that a site can tell a
    policy from the one that replaced it: it never runs under an older version than one it
    has run under (:class:`enclave.sovereignty.PolicyBook`)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return POLICY_CONTEXT + f"{dataset}\n{version}\n{digest}".encode()
