"""The site's privacy accounting: the DP-SGD it grants a job and the ε it charges for it.

ε comes from the site, never from the job. For a built-in trainer asked for DP-SGD
(``dp_epsilon``), :func:`decide` fixes the parameters before the job starts: the sample rate
from the spec's batch size and the training samples the site counts in its own plaintext, the
noise multiplier calibrated to the spec's target (Opacus' RDP accountant). The container gets
them in its configuration and trains with exactly those. :func:`charged_epsilon` is what the
release gate charges afterwards: the accountant's ε of those parameters at the policy's δ, or
+inf for a job with no DP the site set (custom code, a built-in trainer without
``dp_epsilon``), which no DP policy accepts. Whatever the job wrote as ``epsilon`` counts for
nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from policies.errors import InvalidInput
from policies.spec import JobSpec
from trainers import privacy
from trainers.contract import DPParameters
from trainers.errors import ConfigError


def decide(spec: JobSpec, *, training_rows: Callable[[], int]) -> DPParameters | None:
    """The DP-SGD parameters of ``spec``'s job, or None when it asks for none (or is custom
    code, which the site cannot make DP). ``training_rows`` counts the samples the trainer
    draws from (called only for a DP job). Raises :class:`InvalidInput` when the target
    cannot be reached on this data; the text names no figure of the data."""
    if spec.is_custom:
        return None
    try:
        request = privacy.dp_request(spec.trainer, dict(spec.hyperparameters))
        if request is None:
            return None
        rate = min(1.0, request.batch_size / training_rows())
        if spec.federation is None:
            return privacy.calibrate(request.settings, sample_rate=rate, steps=request.steps)
        # Federated: the noise is set for every round the site may train, and each round runs
        # its share of the steps (the site's round record composes them: enclave.federated).
        plan = spec.federation
        whole = privacy.calibrate(request.settings, sample_rate=rate, steps=plan.total_steps)
        return dataclasses.replace(whole, steps=plan.local_steps)
    except ConfigError as e:
        raise InvalidInput(f"{e.field}: DP-SGD cannot be set up for this job on this data") from e


def charged_epsilon(params: DPParameters | None, *, delta: float) -> float:
    """The ε the site charges a job that ran with ``params`` (None: no DP the site set) at
    ``delta``: never negative, never NaN, +inf where there is no trusted DP."""
    if params is None:
        return math.inf
    value = privacy.epsilon(params, delta=delta)
    return value if math.isfinite(value) and value >= 0 else math.inf
