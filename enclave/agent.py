"""The site agent: runs approved jobs next to the data and decides, in the site, what leaves.

One run, in order (every step reported to the gateway, which audits it):

1. check the base model's hash and unpack the code bundle (tar ``data`` filter: no links out,
   no devices, no absolute paths; size- and count-capped);
2. release the data keys and decrypt only the approved dataset versions into a memory-backed
   staging directory; watch it from the host for file opens (the access ledger);
3. start the container (:mod:`enclave.runtime`): no network, read-only root, data/model/code
   read-only, a size-capped memory-backed ``/output``; forward numeric progress only;
4. on a clean exit run the release gate (:mod:`enclave.gate`) for every dataset's rules, then
   sign the provenance manifest (:mod:`enclave.provenance`) with the site's Ed25519 identity;
5. whatever happens, stop the container, destroy the staging and the output mount.

Stdout and stderr are kept in the site (size-capped); they can carry data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import _channels, _dp, _mounts, _progress
from enclave.contract import Report, RunOrder, SiteReport, StoredDataset
from enclave.gate import (
    DPInputs,
    GateResult,
    MemorizationInputs,
    ReleaseForm,
    ReleaseKind,
    run_gate,
)
from enclave.identity import IdentityFiles
from enclave.ledger import AccessLedger, AccessRecord
from enclave.models import ModelStore
from enclave.provenance import AuditPosition, ReleaseContext, SiteSigner, sign_release
from enclave.provenance import DatasetVersion as ProvenanceVersion
from enclave.runtime import ContainerSpec, DockerRuntime, RunState, Runtime
from enclave.secretfile import ensure_secret
from enclave.vault import DatasetVersion as VaultVersion
from enclave.vault import StagingEvent, Vault, iter_tar, wipe_leftovers
from policies import access, channels, document
from policies.channels import REJECTED_BY_CHECK, TeamReason
from policies.errors import InvalidInput, ReleaseRefused, SealroomError, SiteError
from policies.lifecycle import JobState
from policies.release import CheckName, ReleaseRules
from policies.spec import JobSpec
from trainers import privacy
from trainers.contract import CODE_DIR, DATA_DIR, JOB_ENV, MODEL_DIR, DPParameters, JobConfig
from trainers.errors import TrainerError
from trainers.labelled import labelled_file
from trainers.release import expected_release

MAX_BUNDLE_FILES = 10_000
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_LOG_BYTES = channels.LOG_CAP_BYTES
LOG_FILE = "logs.sealed"
PROGRESS_INTERVAL_S = 1.0
BUILTIN_DEFAULT_STEPS = 30
"""``max_steps`` of a built-in trainer when the spec leaves it out (:mod:`trainers.hparams`)."""
CUSTOM_DEFAULT_STEPS = 100
"""``max_steps`` of the team's own module when the spec leaves it out (:mod:`trainers.custom`)."""


@dataclass(frozen=True)
class SiteLimits:
    """What this site grants at most, whatever a spec asks."""

    output_bytes: int = 2 * 1024**3
    tmp_bytes: int = 1024**3
    memory_mb: int = 16 * 1024
    cpus: float = 2.0
    pids: int = 512
    gpus: int = 0
    dataset_bytes: int = 64 * 1024**3
    dataset_files: int = 1_000_000
    runtime: str = "runc"
    """The OCI runtime jobs run under: runc, or runsc (gVisor) or kata where installed."""


DEFAULT_LIMITS = SiteLimits()


def signer_dir(root: Path) -> Path:
    """Where the composition root keeps the release-signing identity of the site at ``root``."""
    return root / "identity"


SITE_LABEL = "org.sealroom.site"
SITE_INSTANCE_LABEL = "org.sealroom.site-instance"


class SiteAgent:
    """One enclave site. Implements :class:`enclave.contract.Site` in-process."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        vault: Vault,
        models: ModelStore,
        runtime: Runtime,
        image: str,
        signer: IdentityFiles,
        limits: SiteLimits = DEFAULT_LIMITS,
    ) -> None:
        self.name = name
        self.root = root
        self.vault = vault
        self.models = models
        self.runtime = runtime
        self.image = image
        self.signer = signer
        self.limits = limits
        self._runs = root / "runs"
        self._staging = root / "staging"
        self._runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log_key = _site_secret(root / "keys" / "logs.key")
        self._bits = _channels.BitsLedger(root / "keys" / "channel-bits.json")
        # This site's containers, told apart from any other site's on the same engine (a
        # shared engine, or two deployments on one machine) even when their names agree.
        self.instance = _site_secret(root / "keys" / "instance.id")[:8].hex()
        self.labels = {SITE_LABEL: name, SITE_INSTANCE_LABEL: self.instance}
        self._cancelled: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._dp: dict[str, DPParameters | None] = {}  # the DP-SGD this site set, per job
        self._lock = threading.Lock()
        # After a crash: no decrypted byte and no output mount may outlive the run. Containers
        # first: a job a crashed agent left running would keep its mounts (the data) alive.
        self.runtime.remove_stale(labels={SITE_INSTANCE_LABEL: self.instance})
        wipe_leftovers(self._staging)
        _mounts.wipe_leftovers(self._runs)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        signer: IdentityFiles,
        name: str = "local-site",
        image: str = "sealroom-runtime:latest",
        runtime: Runtime | None = None,
        limits: SiteLimits = DEFAULT_LIMITS,
    ) -> SiteAgent:
        """Open (or create) the site at ``root``. ``signer`` is the site's release-signing
        identity, issued by the deployment's CA (:meth:`gateway.identity.CertificateAuthority.
        site_signer`, conventionally into ``signer_dir(root)``): the site never holds the CA."""
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        runtime = runtime or DockerRuntime()
        (root / "keys").mkdir(exist_ok=True, mode=0o700)
        vault = Vault(root / "vault", site_key_path=root / "keys" / "site.key")
        return cls(
            name=name,
            root=root,
            vault=vault,
            models=ModelStore(root / "models"),
            runtime=runtime,
            image=runtime.resolve_image(image),
            signer=signer,
            limits=limits,
        )

    # -- Site protocol ----------------------------------------------------------------------

    def image_id(self) -> str:
        return self.image

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        version = self.vault.register(
            name,
            iter_tar(archive),
            max_bytes=self.limits.dataset_bytes,
            max_files=self.limits.dataset_files,
        )
        return StoredDataset(
            name=version.name,
            version=version.version,
            root_hash=version.root_hash,
            size=version.total_bytes,
            files=tuple((e.path, e.size, e.sha256) for e in version.files),
        )

    def rotate_key(self) -> tuple[str, int]:
        key_id = self.vault.rotate_site_key()
        return key_id, sum(len(self.vault.versions(n)) for n in self.vault.datasets())

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)
            handle = self._handles.get(job_id)
        if handle is not None:
            self.runtime.stop(handle)

    def logs(self, job_id: str) -> bytes:
        path = self._runs / _safe(job_id) / LOG_FILE
        if not path.exists():
            return b""
        blob = path.read_bytes()
        return AESGCM(self._log_key).decrypt(blob[:12], blob[12:], job_id.encode())

    def _keep_logs(self, job_id: str, run_dir: Path, data: bytes) -> None:
        """Stdout and stderr can carry data: sealed (AES-GCM, a site key) like the vault's."""
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(self._log_key).encrypt(nonce, data, job_id.encode())
        fd = os.open(run_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(sealed)

    def run(self, order: RunOrder, report: Report) -> None:
        job = order.job_id
        run_dir = self._runs / _safe(job)
        team: _channels.TeamChannel | None = None
        try:
            policies = self._policies(order)
            team = _channels.TeamChannel(
                job,
                rules=channels.job_channel_rules(policies.values()),
                total_steps=_total_steps(order.spec),
                report=report,
            )
            outcome = self._run(order, report, run_dir, team, policies)
            if outcome is not None:
                team.publish(outcome)
        except Exception as e:  # the system's fault, never the job's: report and clean up
            report(
                SiteReport(
                    job,
                    audit_action="run.error",
                    audit_outcome="error",
                    details={
                        "error": type(e).__name__,
                        "message": str(e),
                        # The third-party error under ours (the engine's URL, a container ID):
                        # the site's business, kept here and never in the team's reason.
                        "cause": repr(e.__cause__)[:2000] if e.__cause__ is not None else "",
                    },
                )
            )
            # For the owners and operators only (the team gets the vocabulary's ERROR): our
            # own errors say what went wrong, the site's own failures with the engine's words
            # under them (its address and container ids are the site's business, not the
            # job's data); anything else only its kind (its text may carry what the job wrote).
            if isinstance(e, SiteError):
                said = str(e) + (f" ({e.__cause__})" if e.__cause__ is not None else "")
            elif isinstance(e, SealroomError):
                said = str(e)
            else:
                said = f"unexpected {type(e).__name__}"
            failed = _channels.terminal(job, JobState.ERROR, TeamReason.ERROR, f"site: {said}")
            # The job may have caused it: published on the grid like any end it can influence.
            if team is None:
                report(failed)
            else:
                team.publish(failed)
        finally:
            with self._lock:
                self._cancelled.discard(job)
                self._handles.pop(job, None)
                self._dp.pop(job, None)

    # -- one run ----------------------------------------------------------------------------

    def _run(
        self,
        order: RunOrder,
        report: Report,
        run_dir: Path,
        team: _channels.TeamChannel,
        policies: Mapping[str, document.PolicyDocument],
    ) -> SiteReport | None:
        """Run the job and clean up after it. Returns the run's end, to be published once
        nothing of the run is left (None when it was published already)."""
        job = order.job_id
        spec = order.spec
        if run_dir.exists():
            raise SiteError(f"run directory for {job} already exists: runs are never repeated")
        run_dir.mkdir(mode=0o700)
        if spec.resources.gpus > self.limits.gpus:  # before any data is decrypted
            raise InvalidInput(
                f"the job asks for {spec.resources.gpus} GPUs; this site has {self.limits.gpus}"
            )
        model = self.models.get(spec.base_model)
        rules = [(name, doc.release) for name, doc in policies.items()]
        # Before any byte is decrypted: what the team could observe of this run, charged to
        # each dataset in the site's own ledger (the gateway's tally is not trusted).
        acct = access.job_account(spec, policies.values())
        self._bits.charge(
            acct,
            datasets=policies,
            budgets={n: d.channels.dataset_budget_bits for n, d in policies.items()},
        )
        with ExitStack() as stack:
            code_dir = run_dir / "code"
            code_dir.mkdir(mode=0o755)
            if order.bundle is not None:
                unpack_bundle(order.bundle, code_dir)
            versions = [self.vault.get(n, v) for n, v in order.datasets]

            def on_vault_event(event: StagingEvent) -> None:
                for ref in event.datasets:
                    report(
                        SiteReport(
                            job,
                            audit_action=f"data.{event.kind.value}",
                            audit_dataset=ref,
                            details={"total_bytes": event.total_bytes},
                        )
                    )

            staging = stack.enter_context(
                self.vault.stage(job, versions, dest_root=self._staging, on_event=on_vault_event)
            )

            # Reads are audited when the container has stopped, each with its own time: sent as
            # they happen, their timing would reach the team through the audit log's lock.
            reads: list[AccessRecord] = []
            ledger = stack.enter_context(
                AccessLedger.for_staging(staging, on_first_open=reads.append)
            )
            output = stack.enter_context(
                _mounts.tmpfs(
                    run_dir / "output", size_bytes=self.limits.output_bytes, owner=(10001, 10001)
                )
            )
            if self._is_cancelled(job):
                return SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED)
            dp = self._dp[job] = self._dp_parameters(order, report, model.path, versions)
            cspec = job_container(
                spec,
                dp=dp,
                job_id=job,
                image=self.image,
                limits=self.limits,
                data={n: staging.path(n) for n, _ in order.datasets},
                model_dir=model.path,
                code_dir=code_dir,
                output=output,
                labels=self.labels,
            )
            handle = self.runtime.prepare(cspec)
            stack.callback(self.runtime.cleanup, handle)
            with self._lock:
                self._handles[job] = handle
                cancelled = job in self._cancelled  # a cancel since the check above
            if cancelled:
                return SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED)
            self.runtime.start(handle)
            if self._is_cancelled(job):  # cancelled while it started: cancel found no container
                self.runtime.stop(handle)  # running yet, so stop it here
            report(
                SiteReport(
                    job,
                    state=JobState.RUNNING,
                    image_id=self.image,
                    reason=TeamReason.RUNNING,
                    channel_bits=acct.total,
                    audit_action="container.start",
                    details={
                        "image": self.image,
                        "gpus": cspec.gpus,
                        "memory_bytes": cspec.memory_bytes,
                        "channels": acct.to_dict(),
                    },
                )
            )
            team.started = True
            with _progress.follow(output, team.on_progress, interval_s=PROGRESS_INTERVAL_S):
                status = self.runtime.wait(handle, timeout_s=spec.resources.timeout_s)
            self._keep_logs(job, run_dir, self.runtime.logs(handle, max_bytes=MAX_LOG_BYTES))
            summary = ledger.stop()
            for record in reads:
                report(
                    SiteReport(
                        job,
                        audit_action="data.read",
                        audit_dataset=record.dataset,
                        audit_file=record.path,
                        details={"first_open": record.first_open.isoformat()},
                    )
                )
            if not summary.complete:
                report(
                    SiteReport(
                        job,
                        audit_action="data.read",
                        audit_outcome="error",
                        details={
                            "reason": "the access ledger lost events (queue "
                            "overflow): reads may be missing"
                        },
                    )
                )
            report(
                SiteReport(
                    job,
                    audit_action="container.stop",
                    details={
                        "state": status.state.value,
                        "exit_code": status.exit_code,
                        "reason": status.reason,
                    },
                )
            )
            if self._is_cancelled(job):
                return SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED)
            if status.state is not RunState.EXITED or status.exit_code != 0:
                detail = f"{_failure(status)} (exit code {status.exit_code}) {status.reason}"
                return _channels.terminal(
                    job, JobState.FAILED, _channels.failure_reason(status), detail.strip()
                )
            team.publish(SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING))
            deadline = team.deadline(team.rules.gate_timeout_s)
            gate = _channels.Background(
                lambda: self._gate(
                    order,
                    report,
                    run_dir,
                    output,
                    rules,
                    model.path,
                    model.layout,
                    versions,
                    acct,
                    team.rules.time_quantum_s,
                )
            )
            outcome = gate.result(timeout_s=deadline - time.time())
            if outcome is None:  # still checking at the deadline: its duration is not a channel
                team.publish(
                    _channels.terminal(
                        job,
                        JobState.REJECTED,
                        TeamReason.REJECTED_SLOW,
                        f"the release checks ran past {team.rules.gate_timeout_s:g} s",
                    )
                )
            gate.join()  # the output and the staging outlive the gate's last read
            return outcome

    def _gate(
        self,
        order: RunOrder,
        report: Report,
        run_dir: Path,
        output: Path,
        rules: list[tuple[str, ReleaseRules]],
        model_dir: Path,
        layout: Any,
        versions: list[VaultVersion],
        acct: channels.LeakageAccount,
        quantum_s: float,
    ) -> SiteReport:
        """Run the gate once per dataset's rules; release only if every run passes. Returns
        the terminal report (RELEASED or REJECTED), for the caller to publish on the grid."""
        job = order.job_id
        form = self._release_form(order, report, model_dir, versions)
        gates: dict[str, GateResult] = {}
        for dataset, r in rules:
            memo = None
            if CheckName.MEMORIZATION in r.checks:
                from transformers import AutoTokenizer
                from transformers.utils import logging as hf_logging

                # The probe tokenises whole documents, longer than the model's context on
                # purpose (it samples windows from them): that warning is noise here.
                hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
                tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
                texts = [
                    data.decode("utf-8", "replace")
                    for v in versions
                    if v.name == dataset
                    for _, data in self.vault.iter_plaintext(v)
                ]
                report(
                    SiteReport(
                        job,
                        audit_action="data.gate-read",
                        audit_dataset=dataset,
                        details={"purpose": "memorization check", "files": len(texts)},
                    )
                )
                memo = MemorizationInputs(model_dir=model_dir, tokenizer=tokenizer, texts=texts)
            dp = (
                DPInputs(
                    spent=order.epsilon_spent.get(dataset, 0.0),
                    # The site's accountant over the DP-SGD it set (+inf where it set none),
                    # at this policy's delta: never what the job wrote.
                    epsilon=_dp.charged_epsilon(self._dp.get(job), delta=r.dp.delta),
                )
                if CheckName.DP in r.checks and r.dp is not None
                else None
            )
            result = run_gate(
                output,
                rules=r,
                base_layout=layout,
                form=form,
                dest_dir=run_dir / f"gate-{dataset}",
                memorization=memo,
                dp=dp,
            )
            for check in result.checks:
                report(
                    SiteReport(
                        job,
                        audit_action="release.check",
                        audit_dataset=dataset,
                        audit_outcome="ok" if check.passed else "denied",
                        details={
                            "check": str(check.name),
                            "outcome": str(check.outcome),
                            "reasons": list(check.reasons),
                            "figures": _jsonable(check.figures),
                        },
                    )
                )
            gates[dataset] = result
        refused = [
            f"{d}: {c.name}: {', '.join(c.reasons) or c.outcome}"
            for d, g in gates.items()
            for c in g.checks
            if not c.passed
        ]
        if refused:
            first = next(c.name for g in gates.values() for c in g.checks if not c.passed)
            return _channels.terminal(
                job,
                JobState.REJECTED,
                REJECTED_BY_CHECK[CheckName(first)],
                "release refused: " + "; ".join(refused),
            )
        context = ReleaseContext(
            job_id=job,
            spec_sha256=order.spec_sha256,
            bundle_sha256=order.bundle_sha256 or None,
            image_id=self.image,
            datasets={
                v.name: ProvenanceVersion(version=v.version, root_hash=v.root_hash)
                for v in versions
            },
            policy_versions=dict(order.policy_versions),
            approval_binding=order.approval_binding,
            approvals=tuple(order.approvals),
            audit=AuditPosition(checkpoint_root=order.audit_root),
            channels={**acct.items, "budget_bits": acct.budget},
        )
        try:
            # Stamped with the grid point before signing: the second it was signed would tell
            # how long the checks took (the job steers that).
            issued = channels.round_time(time.time(), quantum_s)
            signed = sign_release(
                gates,
                context=context,
                signer=SiteSigner.from_files(cert=self.signer.cert, key=self.signer.key),
                now=dt.datetime.fromtimestamp(issued, dt.UTC),
            )
        except ReleaseRefused as e:
            return _channels.terminal(job, JobState.REJECTED, TeamReason.REJECTED_SIGNING, str(e))
        metrics = json.loads((signed.directory / "metrics.json").read_text())
        return SiteReport(
            job,
            state=JobState.RELEASED,
            reason=TeamReason.RELEASED,
            metrics={k: float(v) for k, v in metrics.items()},
            release_dir=signed.directory,
            audit_action="release.sign",
            details={"manifest_sha256": signed.manifest_sha256},
        )

    def _dp_parameters(
        self, order: RunOrder, report: Report, model_dir: Path, versions: list[VaultVersion]
    ) -> DPParameters | None:
        """The DP-SGD this site grants the job (None: none), its sample rate from the training
        samples counted in the site's own plaintext with the trainer's own rules."""

        def dataset_files() -> Iterator[tuple[str, bytes]]:
            for v in versions:
                files = [(e.path, d) for e, d in self.vault.iter_plaintext(v)]
                report(
                    SiteReport(
                        order.job_id,
                        audit_action="data.gate-read",
                        audit_dataset=v.name,
                        details={"purpose": "DP-SGD sample rate", "files": len(files)},
                    )
                )
                yield from files

        return _dp.decide(
            order.spec,
            training_rows=lambda: privacy.training_rows(
                order.spec.trainer,
                dict(order.spec.hyperparameters),
                model_dir=model_dir,
                dataset_files=dataset_files,
            ),
        )

    def _release_form(
        self, order: RunOrder, report: Report, model_dir: Path, versions: list[VaultVersion]
    ) -> ReleaseForm | None:
        """What a built-in trainer's release is, from the approved spec and the site's own
        copy of the base model (and, for a classifier without given labels, the data; for a
        private graph, the program in the bundle the site unpacked, which the job could not
        write): never from the job's output. None for custom code, whose release is the base
        layout."""
        spec = order.spec
        if spec.is_custom:
            return None
        code_dir = self._runs / _safe(order.job_id) / "code" if order.bundle is not None else None

        def dataset_files() -> Iterator[tuple[str, bytes]]:
            for v in versions:
                files = [(e, d) for e, d in self.vault.iter_plaintext(v) if labelled_file(e.path)]
                report(
                    SiteReport(
                        order.job_id,
                        audit_action="data.gate-read",
                        audit_dataset=v.name,
                        details={"purpose": "classifier labels", "files": len(files)},
                    )
                )
                yield from ((e.path, d) for e, d in files)

        try:
            expected = expected_release(
                spec.trainer,
                dict(spec.hyperparameters),
                model_dir=model_dir,
                dataset_files=dataset_files,
                code_dir=code_dir,
            )
        except TrainerError as e:
            # The job ran to completion under these very hyperparameters and data: the site
            # and the trainer disagree, which is the system's fault, not the job's.
            raise SiteError(
                f"the release of trainer {spec.trainer!r} cannot be computed: {type(e).__name__}"
            ) from e
        return ReleaseForm(ReleaseKind(expected.kind), expected.layout, expected.config)

    def _policies(self, order: RunOrder) -> dict[str, document.PolicyDocument]:
        """The policies in force for the run's datasets, parsed from the order's texts."""
        out = {}
        for dataset, _ in order.datasets:
            text = order.policy_documents.get(dataset)
            if text is None:
                raise SiteError(f"no policy for {dataset} came with the run order")
            out[dataset] = document.parse_policy(text)
        return out

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled


def _site_secret(path: Path) -> bytes:
    """A 256-bit key kept in a file only the agent reads (created on first use, once: racing
    agents get the same key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ensure_secret(path, lambda: AESGCM.generate_key(bit_length=256))
    if len(key) != 32:
        raise SiteError(f"{path} is not a 256-bit key")
    return key


def _total_steps(spec: JobSpec) -> int:
    """The steps the run's progress schedule is laid over: the spec's ``max_steps``, else the
    trainer's default (the team's own code: the harness's)."""
    steps = spec.hyperparameters.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        return steps
    return CUSTOM_DEFAULT_STEPS if spec.is_custom else BUILTIN_DEFAULT_STEPS


def _safe(job_id: str) -> str:
    if not job_id.replace("-", "").isalnum():
        raise InvalidInput(f"bad job id {job_id!r}")
    return job_id


def _jsonable(figures: Any) -> Any:
    return json.loads(json.dumps(dict(figures or {}), default=str))


def _failure(status: Any) -> str:
    """The team's reason for a job that did not exit cleanly: a fixed phrase, never a number
    (exit code, forks refused) nor the runtime's words; those go to the container.stop audit."""
    if status.state is RunState.KILLED_OOM or status.oom_killed:
        return "failed: out of memory"
    if getattr(status, "at_pids_limit", False):
        return "failed: resource limit"
    if status.state is RunState.KILLED_TIMEOUT:
        return "failed: timeout"
    if status.state is RunState.EXITED:
        return "failed: non-zero exit"
    return "failed: stopped"


def job_container(
    spec: JobSpec,
    *,
    dp: DPParameters | None = None,
    job_id: str,
    image: str,
    limits: SiteLimits,
    data: Mapping[str, Path],
    model_dir: Path,
    code_dir: Path,
    output: Path,
    labels: Mapping[str, str],
) -> ContainerSpec:
    """The container one job runs in: the spec's resources within the site's limits, the data,
    model and code read-only at the contract's paths, the job's configuration in its env."""
    config = JobConfig(
        job_id=job_id,
        trainer=spec.trainer,
        datasets=tuple(data),
        hyperparameters=dict(spec.hyperparameters),
        entrypoint=spec.entrypoint,
        dp=dp,
    )
    return ContainerSpec(
        image=image,
        job_id=job_id,
        env={**spec.env, JOB_ENV: config.to_json()},
        read_only_mounts={
            **{path: str(DATA_DIR / name) for name, path in data.items()},
            model_dir: str(MODEL_DIR),
            code_dir: str(CODE_DIR),
        },
        output_dir=output,
        memory_bytes=min(spec.resources.memory_mb, limits.memory_mb) * 1024**2,
        cpus=min(spec.resources.cpus, limits.cpus),
        pids=limits.pids,
        tmp_bytes=limits.tmp_bytes,
        timeout_s=spec.resources.timeout_s,
        gpus=spec.resources.gpus,
        runtime=limits.runtime,
        labels={"org.sealroom.job": job_id, **labels},
    )


def unpack_bundle(bundle: Path, dest: Path) -> None:
    """Unpack a code bundle with the tar ``data`` filter, capped in files and bytes."""
    try:
        with tarfile.open(bundle, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_BUNDLE_FILES:
                raise InvalidInput(f"code bundle has over {MAX_BUNDLE_FILES} entries")
            if sum(m.size for m in members) > MAX_BUNDLE_BYTES:
                raise InvalidInput(f"code bundle unpacks to over {MAX_BUNDLE_BYTES} bytes")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise InvalidInput(f"code bundle refused: {e}") from e
    for p in [dest, *dest.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
        elif p.is_file():
            p.chmod(0o644)
