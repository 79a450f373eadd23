"""The site agent: runs approved jobs next to the data and decides, in the site, what leaves.

One run, in order (every step reported to the gateway, which audits it):

1. check the base model's hash and unpack the code bundle (tar ``data`` filter: no links out,
   no devices, no absolute paths; size- and count-capped);
2. release the data keys and decrypt only the approved dataset versions into a memory-backed
   staging directory; watch it from the host for file opens (the access ledger);
3. start the container (:mod:`enclave.runtime`): no network, read-only root, data/model/code
   read-only, a size-capped memory-backed ``/output``; or, for a built-in trainer without a
   code bundle on a site that keeps warm containers, give it one started ahead of any job
   (:mod:`enclave._warm`: the job's limits first, then its data and model, then its
   assignment); forward numeric progress only;
4. on a clean exit run the release gate (:mod:`enclave.gate`) for every dataset's rules, then
   sign the provenance manifest (:mod:`enclave.provenance`) with the site's Ed25519 identity;
5. whatever happens, stop the container, destroy the staging and the output mount.

Stdout and stderr are kept in the site (size-capped); they can carry data.

The steps live here (:class:`SiteAgent`); the container and the bundle in
:mod:`enclave._jobcontainer`, what is audited of its start, its stop and its errors in
:mod:`enclave._run_audit`, the gate and signing in :mod:`enclave._release_steps`, the site's
secrets and sealed logs in :mod:`enclave._sitekeys`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

from enclave import _channels, _mounts, _progress, _warm, sovereignty
from enclave._agent_rounds import RoundRuns, round_run_id
from enclave._jobcontainer import (
    DEFAULT_LIMITS,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_FILES,
    SiteLimits,
    job_container,
    unpack_bundle,
)
from enclave._release_steps import check_and_sign, dp_parameters
from enclave._round_steps import check_round
from enclave._run_audit import (
    failure_phrase,
    report_error,
    report_start,
    report_stop,
    vault_events,
)
from enclave._sitekeys import LOG_FILE, open_logs, seal_logs, site_secret
from enclave.contract import Report, RoundOrder, RoundUpdate, RunOrder, SiteReport, StoredDataset
from enclave.federated import RoundBook
from enclave.identity import IdentityFiles
from enclave.ledger import AccessLedger, AccessRecord
from enclave.models import ModelStore
from enclave.runtime import ContainerSpec, DockerRuntime, RunState, Runtime
from enclave.vault import Vault, iter_tar, wipe_leftovers
from policies import access, channels, document
from policies.channels import TeamReason
from policies.errors import InvalidInput, SiteError
from policies.lifecycle import JobState
from trainers.contract import (
    BUILTIN_DEFAULT_STEPS,
    CUSTOM_DEFAULT_STEPS,
    DPParameters,
    RoundTraining,
    planned_steps,
)

__all__ = [
    "BUILTIN_DEFAULT_STEPS",
    "CUSTOM_DEFAULT_STEPS",
    "DEFAULT_LIMITS",
    "LOG_FILE",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "MAX_LOG_BYTES",
    "PROGRESS_INTERVAL_S",
    "SITE_INSTANCE_LABEL",
    "SITE_LABEL",
    "SiteAgent",
    "SiteLimits",
    "job_container",
    "signer_dir",
    "unpack_bundle",
]

_site_secret = site_secret  # the names tests used before the split
_failure = failure_phrase

MAX_LOG_BYTES = channels.LOG_CAP_BYTES
PROGRESS_INTERVAL_S = _channels.MAX_READING_INTERVAL_S
"""The longest interval between two readings of a job's progress (owners see each reading); the
readings fall just before every point of the team's time grid (:class:`_channels.TeamChannel`)."""


def signer_dir(root: Path) -> Path:
    """Where the composition root keeps the release-signing identity of the site at ``root``."""
    return root / "identity"


SITE_LABEL = "org.sealroom.site"
SITE_INSTANCE_LABEL = "org.sealroom.site-instance"


class SiteAgent(RoundRuns):
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
        owners: sovereignty.Owners = lambda dataset: None,
    ) -> None:
        self.name = name
        self.root = root
        self.owners = owners
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
        self._log_key = site_secret(root / "keys" / "logs.key")
        self._bits = _channels.BitsLedger(root / "keys" / "channel-bits.json")
        self._policy_book = sovereignty.PolicyBook.of_site(root)
        self.rounds = RoundBook.of_site(root)
        self._kept: dict[tuple[str, int], RoundUpdate] = {}  # gated round updates, in memory
        self._training: dict[tuple[str, int], threading.Event] = {}  # rounds training now
        # This site's containers, told apart from any other site's on the same engine (a
        # shared engine, or two deployments on one machine) even when their names agree.
        self.instance = site_secret(root / "keys" / "instance.id")[:8].hex()
        self.labels = {SITE_LABEL: name, SITE_INSTANCE_LABEL: self.instance}
        self._cancelled: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._dp: dict[str, DPParameters | None] = {}  # the DP-SGD this site set, per job
        self._lock = threading.Lock()
        # After a crash: no decrypted byte and no output mount may outlive the run. Containers
        # first: a job a crashed agent left running would keep its mounts (the data) alive.
        self.runtime.remove_stale(labels={SITE_INSTANCE_LABEL: self.instance})
        # Warm slots before the staging: a slot's read-only bind keeps a staging tmpfs alive.
        _warm.WarmPool.wipe_leftovers(root / "warm")
        wipe_leftovers(self._staging)
        _mounts.wipe_leftovers(self._runs)
        self._warm = self._warm_pool()
        self._warm.fill()

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
        owners: sovereignty.Owners = lambda dataset: None,
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
            owners=owners,
        )

    # -- warm containers --------------------------------------------------------------------

    def warm_ready(self, *, timeout_s: float) -> bool:
        """Whether every warm container this site keeps (``limits.warm_containers``) is
        started and done warming, waiting up to ``timeout_s``. True when it keeps none."""
        return not self._warm.available() or self._warm.ready(timeout_s=timeout_s)

    def keep_warm(self, count: int) -> None:
        """Keep ``count`` warm containers from now on (``SiteLimits.warm_containers``); the
        ones waiting are destroyed and the new count warmed in the background."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidInput(f"count: must be a non-negative integer, got {count!r}")
        self.limits = dataclasses.replace(self.limits, warm_containers=count)
        self._warm.close()
        self._warm = self._warm_pool()
        self._warm.fill()

    def _warm_pool(self) -> _warm.WarmPool:
        return _warm.WarmPool(
            self.root / "warm",
            runtime=self.runtime,
            image=self.image,
            limits=self.limits,
            labels=self.labels,
        )

    def close(self) -> None:
        """Destroy the warm containers waiting for a job (runs in progress are not touched)."""
        self._warm.close()

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
        return open_logs(self._log_key, job_id, self._runs / _safe(job_id))

    def run(self, order: RunOrder, report: Report) -> None:
        job = order.job_id
        run_dir = self._runs / _safe(job)
        team: _channels.TeamChannel | None = None
        try:
            policies = sovereignty.order_policies(order)
            team = _channels.TeamChannel(
                job,
                rules=channels.job_channel_rules(policies.values()),
                total_steps=planned_steps(order.spec.hyperparameters, custom=order.spec.is_custom),
                report=report,
            )
            outcome = self._run(order, report, run_dir, team, policies)
            if isinstance(outcome, SiteReport):
                team.publish(outcome)
        except Exception as e:  # the system's fault, never the job's: report and clean up
            failed = report_error(job, e, report)
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
            self._warm.fill()  # after the run: warming never runs beside a job's start

    # -- one run ----------------------------------------------------------------------------

    def _run(
        self,
        order: RunOrder,
        report: Report,
        run_dir: Path,
        team: _channels.TeamChannel,
        policies: Mapping[str, document.PolicyDocument],
        rnd: RoundOrder | None = None,
    ) -> SiteReport | RoundUpdate | None:
        """Run the job (or, with ``rnd``, one federated round of it, as ``run_dir``'s run)
        and clean up after it. Returns the run's end, to be published once nothing of the run
        is left (None when it was published already), or the round's gated update."""
        job = order.job_id
        run_id = job if rnd is None else round_run_id(job, rnd.round)
        spec = order.spec
        if spec.is_federated and rnd is None:
            raise InvalidInput("a federated job runs round by round (train_round), not whole")
        if run_dir.exists():
            raise SiteError(f"run directory for {run_id} already exists: runs are never repeated")
        run_dir.mkdir(mode=0o700)
        held = self._held(order, federated=rnd is not None)
        # Before any data is decrypted: what the owners signed covers exactly this order.
        sovereignty.check_order(
            order,
            policies,
            ca_cert_pem=self.signer.ca_cert.read_bytes(),
            owners=self._owners_for(order, held),
            book=self._policy_book,
        )
        if spec.resources.gpus > self.limits.gpus:  # before any data is decrypted
            raise InvalidInput(
                f"the job asks for {spec.resources.gpus} GPUs; this site has {self.limits.gpus}"
            )
        model = self.models.get(spec.base_model)
        mine = {n: d for n, d in policies.items() if n in dict(held)}
        rules = [(name, doc.release) for name, doc in mine.items()]
        # Before any byte is decrypted: what the team could observe of this run, charged to
        # each dataset in the site's own ledger (the gateway's tally is not trusted). A
        # federated job is charged once, at the first round this site trains.
        acct = access.job_account(spec, mine.values())
        if rnd is None or self.rounds.job(job) is None:
            self._bits.charge(
                acct,
                datasets=mine,
                budgets={n: d.channels.dataset_budget_bits for n, d in mine.items()},
            )
        with ExitStack() as stack:
            code_dir = run_dir / "code"
            code_dir.mkdir(mode=0o755)
            if order.bundle is not None:
                unpack_bundle(order.bundle, code_dir)
            versions = [self.vault.get(n, v) for n, v in held]

            staging = stack.enter_context(
                self.vault.stage(
                    run_id, versions, dest_root=self._staging, on_event=vault_events(run_id, report)
                )
            )

            # Reads are audited when the container has stopped, each with its own time: sent as
            # they happen, their timing would reach the team through the audit log's lock.
            reads: list[AccessRecord] = []
            ledger = stack.enter_context(
                AccessLedger.for_staging(staging, on_first_open=reads.append)
            )

            def cold_output() -> Path:
                return stack.enter_context(
                    _mounts.tmpfs(
                        run_dir / "output",
                        size_bytes=self.limits.output_bytes,
                        owner=(10001, 10001),
                    )
                )

            slot = self._warm.take() if rnd is None and self._warm.serves(order) else None
            if slot is not None:  # destroyed with the run, given or not
                stack.callback(slot.destroy, self.runtime)
            output = slot.output if slot is not None else cold_output()
            if self._is_cancelled(job):
                return SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED)
            dp = self._dp[job] = dp_parameters(order, report, self.vault, model.path, versions)
            start_dir = None
            if rnd is not None:  # before the job runs: the round is within the plan and ε
                start_dir = self._round_start(rnd, run_dir)
                self._admit_round(rnd, dp, mine)

            def container(output: Path, code: Path) -> ContainerSpec:
                return job_container(
                    spec,
                    dp=dp,
                    job_id=run_id,
                    image=self.image,
                    limits=self.limits,
                    data={n: staging.path(n) for n, _ in held},
                    model_dir=model.path,
                    code_dir=code,
                    output=output,
                    labels=self.labels,
                    federated_round=None
                    if rnd is None or spec.federation is None
                    else RoundTraining(rnd.round, spec.federation.proximal_mu),
                    start_dir=start_dir,
                )

            handle = None
            if slot is not None:
                cspec = container(slot.output, slot.code)
                # The job's limits, then its data and model, then its assignment: the job runs
                # from here (its deadline counts from the limits); or refused: start cold.
                handle = self._warm.give_or_refuse(slot, cspec, stack, report)
                if handle is None:
                    output = cold_output()
            if handle is None:
                cspec = container(output, code_dir)
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
            warm = slot is not None and output == slot.output
            report(report_start(run_id, self.image, cspec, acct, warm_container=warm))
            team.started = True
            with _progress.follow(
                output,
                team.on_progress,
                interval_s=team.reading_interval_s,
                lead_s=team.read_lead_s,
            ):
                status = self.runtime.wait(handle, timeout_s=spec.resources.timeout_s)
            seal_logs(
                self._log_key, run_id, run_dir, self.runtime.logs(handle, max_bytes=MAX_LOG_BYTES)
            )
            summary = ledger.stop()
            report_stop(run_id, report, reads, summary, status)
            if self._is_cancelled(job):
                return SiteReport(job, state=JobState.CANCELLED, reason=TeamReason.CANCELLED)
            if status.state is not RunState.EXITED or status.exit_code != 0:
                detail = f"{failure_phrase(status)} (exit code {status.exit_code}) {status.reason}"
                return _channels.terminal(
                    job, JobState.FAILED, _channels.failure_reason(status), detail.strip()
                )
            if rnd is not None:
                return check_round(
                    rnd,
                    report,
                    run_id=run_id,
                    vault=self.vault,
                    run_dir=run_dir,
                    output=output,
                    rules=rules,
                    model_dir=model.path,
                    layout=model.layout,
                    versions=versions,
                    epsilon=self._round_epsilon(job, mine),
                    weight=self._round_weight(order, report, model.path, versions),
                )
            team.publish(SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING))
            deadline = team.deadline(team.rules.gate_timeout_s)
            gate = _channels.Background(
                lambda: check_and_sign(
                    order,
                    report,
                    vault=self.vault,
                    image=self.image,
                    signer=self.signer,
                    dp_set=self._dp.get(job),
                    run_dir=run_dir,
                    output=output,
                    rules=rules,
                    model_dir=model.path,
                    layout=model.layout,
                    versions=versions,
                    acct=acct,
                    quantum_s=team.rules.time_quantum_s,
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

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled


def _safe(job_id: str) -> str:
    if not job_id.replace("-", "").isalnum():
        raise InvalidInput(f"bad job id {job_id!r}")
    return job_id
