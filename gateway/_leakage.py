"""What each dataset has already given away, tallied for the policy decisions: the privacy
budget (ε) charged by the site's accountant in the signed manifests of released jobs, and the
channel capacity (bits) of every job that started on it. The tallies fail closed: a release whose
record cannot be read counts as having spent everything.

Both come from the store's ledger (:mod:`gateway.store`): a job's ε is read once, from its signed
release, in the transaction that makes it RELEASED (:func:`release_charges`), its bits when its
run reports them; a decision reads one running tally per dataset, never every released job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from enclave.provenance.federated import SCHEMA as FEDERATED
from gateway._ledger import BITS, EPSILON, WORST, ReleaseCharges
from gateway.store import JobRecord, Store


def release_charges(releases: Path) -> ReleaseCharges:
    """The ε a released job charged each of its datasets, read from its signed release manifest
    under ``releases/<job id>/``: for each dataset, that dataset's DP check's figure (the site's
    accountant's, never a metric the job wrote; the last such check where a gate has several).
    A dataset whose gate ran no DP check spent none of its DP budget. A figure that reads as
    anything but a finite number >= 0 is charged the largest float; a manifest that cannot be
    read or parsed, the largest float to every dataset of the job (fail closed: later DP jobs
    on the dataset are refused by the budget, and the tally stays a finite number)."""

    def charges(job: JobRecord) -> dict[str, float]:
        touched = {d.name for d in job.datasets}
        charged = dict.fromkeys(touched, 0.0)
        try:
            manifest = json.loads((releases / job.id / "manifest.json").read_bytes())
            if manifest.get("schema") == FEDERATED:
                return _federated_charges(manifest, charged)
            for gate in manifest["gates"]:
                if gate["dataset"] not in charged:
                    continue
                for check in gate["checks"]:
                    if check["name"] == "dp":
                        eps = check["figures"].get("epsilon", WORST)
                        ok = isinstance(eps, int | float) and not isinstance(eps, bool)
                        ok = ok and math.isfinite(eps) and eps >= 0
                        charged[gate["dataset"]] = float(eps) if ok else WORST
        except Exception:  # unreadable, malformed, too deeply nested: all of it, fail closed
            charged = dict.fromkeys(touched, WORST)
        return charged

    return charges


def _federated_charges(manifest: dict[str, object], charged: dict[str, float]) -> dict[str, float]:
    """A federated release charges each dataset, once, the ε its site countersigned (composed
    over every round it trained); a site with no DP it set (no ε) charges nothing."""
    sites = manifest["sites"]
    assert isinstance(sites, list)
    for site in sites:
        eps = site["epsilon"]
        if eps is None:
            continue
        ok = isinstance(eps, int | float) and not isinstance(eps, bool)
        ok = ok and math.isfinite(eps) and eps >= 0
        for dataset in site["datasets"]:
            if dataset in charged:
                charged[dataset] = float(eps) if ok else WORST
    return charged


def epsilon_spent(store: Store, names: list[str]) -> dict[str, float]:
    """Privacy budget already released per dataset: the sum, over its released jobs, of the ε
    each was charged at its release (see :func:`release_charges`), at most the largest float."""
    return store.spent(EPSILON, names)


def bits_spent(store: Store, names: list[str]) -> dict[str, float]:
    """Channel capacity already used per dataset: every job that started on it."""
    return store.spent(BITS, names)
