"""Two logs, one story, checked offline: a remote site's audit log against the gateway's.

The gateway records each checkpoint a site pushes as a ``site.checkpoint`` event in its own
log, the checkpoint whole (:meth:`SignedCheckpoint.to_dict`). :func:`cross_check` takes an
export of each log (the site's from the site itself or from the gateway's copy of it) and the
two public keys, and shows that

- each export verifies on its own (:func:`~enclave.audit.verify_export`): no record edited,
  removed or reordered in either, every checkpoint signed by its log's key;
- every site checkpoint the gateway recorded is signed by the site's key, and the site's export
  extends it: its first ``size`` records have the recorded root.

So a site that drops or rewrites a record it has reported fails the second check, and a gateway
that drops a site's checkpoint breaks its own log's chain (the first).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.audit._model import SignedCheckpoint, VerifyResult
from enclave.audit._verify import verify_export
from policies.errors import AuditLogError, InvalidInput

ACTION = "site.checkpoint"
"""The gateway's record of a site checkpoint it took; its details are the checkpoint's
:meth:`~enclave.audit.SignedCheckpoint.to_dict`."""


@dataclass(frozen=True)
class CrossCheck:
    site: VerifyResult  # the site's export
    gateway: VerifyResult  # the gateway's export
    recorded: tuple[SignedCheckpoint, ...]  # the site's checkpoints in the gateway's log

    @property
    def latest(self) -> int:
        """The largest size of the site's log the gateway recorded (0: none)."""
        return self.recorded[-1].size if self.recorded else 0


def recorded_checkpoints(gateway_export: Path, site: str) -> list[SignedCheckpoint]:
    """The ``site.checkpoint`` events of ``site`` in a gateway export, as checkpoints, in the
    order the gateway recorded them. Raises InvalidInput for one that is malformed."""
    found: list[SignedCheckpoint] = []
    try:
        with gateway_export.open("rb") as f:
            for raw in f:
                if b'"' + ACTION.encode() + b'"' not in raw:
                    continue
                leaf = json.loads(raw).get("leaf")
                if not isinstance(leaf, dict) or leaf.get("action") != ACTION:
                    continue
                if leaf.get("principal") != site:
                    continue
                found.append(SignedCheckpoint.from_dict(leaf.get("details")))
    except OSError as e:
        raise AuditLogError(f"cannot read the export {gateway_export}: {e}") from e
    except ValueError as e:
        raise InvalidInput(f"{gateway_export}: a {ACTION} record is malformed ({e})") from e
    return found


def cross_check(
    site_export: Path,
    gateway_export: Path,
    *,
    site: str,
    site_key: ed25519.Ed25519PublicKey,
    gateway_key: ed25519.Ed25519PublicKey,
    extends: Sequence[SignedCheckpoint] = (),
) -> CrossCheck:
    """Check that ``site``'s log and the gateway's tell one story (see the module docstring),
    and that the site's extends each of ``extends`` (its checkpoints seen before). Raises
    :class:`AuditLogError`: a RecordError, CheckpointError or ProofError naming what does not
    hold."""
    gateway = verify_export(gateway_export, public_key=gateway_key)
    recorded = recorded_checkpoints(gateway_export, site)
    result = verify_export(site_export, public_key=site_key, extends=[*recorded, *extends])
    return CrossCheck(site=result, gateway=gateway, recorded=tuple(recorded))
