"""``sealroom job try SPEC --mock``: a model team's dry run of its job on published mocks.

The job runs exactly as it would in the site — the same runtime image, the same container
(:func:`enclave.agent.job_container`: no network, read-only root, the same mounts and limits),
the same harness — but on the data owners' mock datasets, on the team's own machine, with no
approval and no access to the real data. The release gate then runs on the output with the
policies' rules, except the memorization check (it needs the real data; it runs in the site).
Nothing is signed and nothing is audited: a try proves nothing to anyone but the team.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from enclave.agent import DEFAULT_LIMITS, SiteLimits, job_container, unpack_bundle
from enclave.gate import DPInputs, layout_from_files, run_gate
from enclave.runtime import RunState, Runtime
from policies import channels
from policies.release import CheckName, ReleaseRules
from policies.spec import JobSpec
from trainers.contract import JOB_USER

MAX_LOG_BYTES = channels.LOG_CAP_BYTES


@dataclass(frozen=True)
class TryCheck:
    dataset: str
    check: str
    passed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class TryResult:
    """How the dry run ended: the container's end, its logs (the team's own: mock data only),
    the gate's checks and the metrics the gate would release."""

    state: str
    exit_code: int | None
    reason: str
    logs: bytes
    checks: tuple[TryCheck, ...]
    metrics: Mapping[str, float]

    @property
    def would_release(self) -> bool:
        return (
            self.state == RunState.EXITED.value
            and self.exit_code == 0
            and bool(self.checks)
            and all(c.passed for c in self.checks)
        )


def try_run(
    spec: JobSpec,
    *,
    mocks: Mapping[str, Path],
    model_dir: Path,
    bundle: Path | None,
    rules: Mapping[str, ReleaseRules],
    runtime: Runtime,
    image: str,
    limits: SiteLimits = DEFAULT_LIMITS,
) -> TryResult:
    """Run ``spec`` on ``mocks`` (dataset name -> mock directory) in ``image``; gate the output.

    Raises :class:`~policies.errors.InvalidInput` for a bad bundle or spec and
    :class:`~policies.errors.RuntimeBackendError` when the engine fails."""
    job_id = f"try-{os.urandom(4).hex()}"
    with tempfile.TemporaryDirectory(prefix="sealroom-try-") as tmp:
        work = Path(tmp)
        code = work / "code"
        code.mkdir(mode=0o755)
        if bundle is not None:
            unpack_bundle(bundle, code)
        output = work / "output"
        output.mkdir()
        # The job runs as JOB_USER; on the team's machine we may not be root to chown.
        os.chmod(output, 0o777)  # noqa: S103 (a throw-away directory for the team's own run)
        if os.geteuid() == 0:
            uid, gid = (int(x) for x in JOB_USER.split(":"))
            os.chown(output, uid, gid)
            os.chmod(output, 0o700)
        cspec = job_container(
            spec,
            job_id=job_id,
            image=runtime.resolve_image(image),
            limits=limits,
            data=dict(mocks),
            model_dir=model_dir,
            code_dir=code,
            output=output,
            labels={"org.sealroom.try": "true"},
        )
        handle = runtime.prepare(cspec)
        try:
            runtime.start(handle)
            status = runtime.wait(handle, timeout_s=spec.resources.timeout_s + 30)
            logs = runtime.logs(handle, max_bytes=MAX_LOG_BYTES)
        finally:
            runtime.cleanup(handle)
        checks: list[TryCheck] = []
        metrics: dict[str, float] = {}
        if status.state is RunState.EXITED and status.exit_code == 0:
            layout = layout_from_files(sorted(model_dir.glob("*.safetensors")))
            for name, r in rules.items():
                without = dataclasses.replace(
                    r, checks=frozenset(r.checks - {CheckName.MEMORIZATION}), memorization=None
                )
                dp = DPInputs(spent=0.0) if CheckName.DP in r.checks else None
                result = run_gate(
                    output, rules=without, base_layout=layout, dest_dir=work / f"gate-{name}", dp=dp
                )
                checks += [
                    TryCheck(name, str(c.name), c.passed, tuple(c.reasons)) for c in result.checks
                ]
                m = work / f"gate-{name}" / "metrics.json"
                if m.exists():
                    metrics = {k: float(v) for k, v in json.loads(m.read_text()).items()}
        return TryResult(
            status.state.value, status.exit_code, status.reason, logs, tuple(checks), metrics
        )
