"""The release gate: what of a job's ``/output`` may leave the site, decided next to the data.

:func:`run_gate` checks the artifacts (no links, no pickles), the weights (structure equal to
the declared model, re-serialised and re-quantised), the metrics, memorization of the protected
data and the privacy budget, and returns a :class:`GateResult`. The rules and the pure
decisions live in :mod:`policies.release`; signing the release is :mod:`enclave.provenance`.
"""

from enclave.gate._gate import (
    RELEASED_METRICS,
    RELEASED_WEIGHTS,
    DPInputs,
    GateResult,
    MemorizationInputs,
    ReleasedArtifact,
    layout_from_files,
    layout_from_model_dir,
    run_gate,
)
from enclave.gate._memorization import Tokenizer, load_released_model, measure_memorization

__all__ = [
    "RELEASED_METRICS",
    "RELEASED_WEIGHTS",
    "DPInputs",
    "GateResult",
    "MemorizationInputs",
    "ReleasedArtifact",
    "Tokenizer",
    "layout_from_files",
    "layout_from_model_dir",
    "load_released_model",
    "measure_memorization",
    "run_gate",
]
