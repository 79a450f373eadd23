"""The site link's wire forms of the site contract's values, for both ends of the link.

A :class:`RunOrder` travels as JSON (its spec as the spec's canonical JSON, re-parsed and
re-hashed at the site: a spec that is not the one the order's hash names is refused there); a
:class:`SiteReport` as ``sealroom.v1.SiteReport``. The gateway writes orders and reads reports
(:mod:`gateway._sitelink`), the site the other way round (:mod:`enclave.link`); both use these
functions, so the two ends cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sealroom.v1 import site_pb2 as pb

from enclave.contract import RunOrder, SiteReport
from policies.errors import InvalidInput, SpecError
from policies.lifecycle import JobState
from policies.spec import spec_from_mapping


def order_json(order: RunOrder) -> str:
    """The order less its bundle's path (the site fetches the bundle over the link)."""
    return json.dumps(
        {
            "job_id": order.job_id,
            "spec": order.spec.to_dict(),
            "spec_sha256": order.spec_sha256,
            "bundle_sha256": order.bundle_sha256,
            "datasets": [list(d) for d in order.datasets],
            "policy_versions": dict(order.policy_versions),
            "policy_documents": dict(order.policy_documents),
            "approval_binding": order.approval_binding,
            "approvals": list(order.approvals),
            "audit_root": order.audit_root,
            "epsilon_spent": dict(order.epsilon_spent),
            "dataset_owners": dict(order.dataset_owners),
            "approval_signatures": {k: list(v) for k, v in order.approval_signatures.items()},
            "policy_signatures": {k: list(v) for k, v in order.policy_signatures.items()},
        },
        sort_keys=True,
    )


def order_from_json(text: str, *, bundle: Path | None) -> RunOrder:
    """The order :func:`order_json` wrote, with the bundle the site fetched. Raises
    :class:`InvalidInput` naming what is missing or wrong, and when the spec is not the one
    the order's ``spec_sha256`` names."""
    try:
        raw = json.loads(text)
        spec = spec_from_mapping(raw["spec"])
        order = RunOrder(
            job_id=_str(raw, "job_id"),
            spec=spec,
            spec_sha256=_str(raw, "spec_sha256"),
            bundle=bundle,
            bundle_sha256=_str(raw, "bundle_sha256"),
            datasets=tuple((str(n), int(v)) for n, v in raw["datasets"]),
            policy_versions={str(k): int(v) for k, v in raw["policy_versions"].items()},
            policy_documents={str(k): str(v) for k, v in raw["policy_documents"].items()},
            approval_binding=_str(raw, "approval_binding"),
            approvals=tuple(str(a) for a in raw["approvals"]),
            audit_root=_str(raw, "audit_root"),
            epsilon_spent={str(k): float(v) for k, v in raw["epsilon_spent"].items()},
            dataset_owners={str(k): str(v) for k, v in raw["dataset_owners"].items()},
            approval_signatures=_pairs(raw["approval_signatures"]),
            policy_signatures=_pairs(raw["policy_signatures"]),
        )
    except SpecError as e:
        raise InvalidInput(f"run order: its spec is not valid: {e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInput(f"run order: malformed ({type(e).__name__}: {e})") from e
    if spec.digest() != order.spec_sha256:
        raise InvalidInput(
            f"run order {order.job_id}: its spec hashes to {spec.digest()}, "
            f"not to the {order.spec_sha256} it names"
        )
    return order


def _pairs(raw: dict[str, Any]) -> dict[str, tuple[str, str]]:
    out = {}
    for k, v in raw.items():
        cert, sig = v
        out[str(k)] = (str(cert), str(sig))
    return out


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _progress(p: tuple[int, int, float] | None) -> pb.RunProgress | None:
    return None if p is None else pb.RunProgress(step=p[0], total=p[1], loss=p[2])


def report_message(r: SiteReport) -> pb.SiteReport:
    """The wire form of a report; ``has_release`` stands for ``release_dir``."""
    msg = pb.SiteReport(
        job_id=r.job_id,
        state=r.state.value if r.state is not None else "",
        reason=r.reason,
        detail=r.detail,
        progress=_progress(r.progress),
        owner_progress=_progress(r.owner_progress),
        audit_action=r.audit_action,
        audit_outcome=r.audit_outcome,
        audit_dataset=r.audit_dataset,
        audit_file=r.audit_file,
        details_json=json.dumps(dict(r.details), sort_keys=True) if r.details else "",
        image_id=r.image_id,
        metrics=dict(r.metrics),
        has_release=r.release_dir is not None,
    )
    if r.channel_bits is not None:
        msg.channel_bits = r.channel_bits
    return msg


def report_value(msg: pb.SiteReport, *, release_dir: Path | None, site: str) -> SiteReport:
    """The report a message carries, from site ``site``; ``release_dir`` is where its pushed
    release lies (None when it said it has none). Raises :class:`InvalidInput`."""
    try:
        state = JobState(msg.state) if msg.state else None
    except ValueError:
        raise InvalidInput(f"report: unknown state {msg.state!r}") from None
    if msg.has_release != (release_dir is not None):
        raise InvalidInput("report: it says it has a release, but none was pushed")
    try:
        details = json.loads(msg.details_json) if msg.details_json else {}
    except ValueError as e:
        raise InvalidInput(f"report: details are not JSON: {e}") from e
    if not isinstance(details, dict):
        raise InvalidInput("report: details must be a JSON object")

    def progress(field: str) -> tuple[int, int, float] | None:
        if not msg.HasField(field):  # type: ignore[arg-type]
            return None
        p = getattr(msg, field)
        return (int(p.step), int(p.total), float(p.loss))

    return SiteReport(
        job_id=msg.job_id,
        state=state,
        reason=msg.reason,
        detail=msg.detail,
        progress=progress("progress"),
        owner_progress=progress("owner_progress"),
        channel_bits=msg.channel_bits if msg.HasField("channel_bits") else None,
        audit_action=msg.audit_action,
        audit_outcome=msg.audit_outcome or "ok",
        audit_dataset=msg.audit_dataset,
        audit_file=msg.audit_file,
        details=details,
        image_id=msg.image_id,
        metrics=dict(msg.metrics),
        release_dir=release_dir,
        site=site,
    )
