"""The release gate: what of a job's ``/output`` may leave the site, decided next to the data.

:func:`run_gate` checks the artifacts (no links, no pickles), the weights (structure equal to
the declared model, re-serialised and re-quantised), the metrics, memorization of the protected
data and the privacy budget, and returns a :class:`GateResult`. A :class:`ReleaseForm` says
what a built-in trainer's release is (full, LoRA adapter, classifier) and carries the site's
own config file for it. The rules and the pure decisions live in :mod:`policies.release`;
signing the release is :mod:`enclave.provenance`.
"""

from enclave.gate._gate import (
    RELEASED_ADAPTER,
    RELEASED_METRICS,
    RELEASED_WEIGHTS,
    DPInputs,
    GateResult,
    MemorizationInputs,
    ReleasedArtifact,
    ReleaseForm,
    ReleaseKind,
    layout_from_files,
    layout_from_model_dir,
    run_gate,
)
from enclave.gate._memorization import (
    NotProbeable,
    Tokenizer,
    load_adapter_release,
    load_backbone_release,
    load_released_model,
    measure_memorization,
)

__all__ = [
    "RELEASED_ADAPTER",
    "RELEASED_METRICS",
    "RELEASED_WEIGHTS",
    "DPInputs",
    "GateResult",
    "MemorizationInputs",
    "NotProbeable",
    "ReleaseForm",
    "ReleaseKind",
    "ReleasedArtifact",
    "Tokenizer",
    "layout_from_files",
    "layout_from_model_dir",
    "load_adapter_release",
    "load_backbone_release",
    "load_released_model",
    "measure_memorization",
    "run_gate",
]
