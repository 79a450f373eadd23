"""What each dataset has already given away, tallied for the policy decisions: the privacy
budget (ε) charged by the site's accountant in the signed manifests of released jobs, and the
channel capacity (bits) of every job that started on it. The tallies fail closed: a release whose
record cannot be read counts as having spent everything.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gateway.store import Store
from policies.lifecycle import JobState


def epsilon_spent(store: Store, releases: Path, names: list[str]) -> dict[str, float]:
    """Privacy budget already released per dataset: the sum, over released jobs, of the ε the
    site's accountant charged each in its signed release manifest (that dataset's DP check,
    under ``releases/<job id>/``), never a metric the job wrote. A release whose gate ran no DP
    check on the dataset spent none of its DP budget; one whose record cannot be read, or reads
    as anything but a finite number >= 0, is charged the largest float (fail closed: later DP
    jobs on the dataset are refused by the budget, and the sum stays a finite number)."""
    spent = dict.fromkeys(names, 0.0)
    worst = sys.float_info.max
    for job in store.jobs(state=JobState.RELEASED):
        touched = {d.name for d in job.datasets if d.name in spent}
        if not touched:
            continue
        charged = dict.fromkeys(touched, 0.0)
        try:
            manifest = json.loads((releases / job.id / "manifest.json").read_bytes())
            for gate in manifest["gates"]:
                if gate["dataset"] not in charged:
                    continue
                for check in gate["checks"]:
                    if check["name"] == "dp":
                        eps = check["figures"].get("epsilon", worst)
                        ok = isinstance(eps, int | float) and not isinstance(eps, bool)
                        ok = ok and math.isfinite(eps) and eps >= 0
                        charged[gate["dataset"]] = float(eps) if ok else worst
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            charged = dict.fromkeys(touched, worst)
        for name, eps in charged.items():
            spent[name] = min(worst, spent[name] + eps)
    return spent


def bits_spent(store: Store, names: list[str]) -> dict[str, float]:
    """Channel capacity already used per dataset: every job that started on it."""
    used = store.channel_bits_spent()
    return {name: used.get(name, 0.0) for name in names}
