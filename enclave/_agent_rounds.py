"""The site agent's federated rounds (:class:`RoundRuns`, a part of
:class:`enclave.agent.SiteAgent`): one round runs as a job does (the same checks of the order,
staging, container and access ledger, in :meth:`SiteAgent._run`), from the round's start, for
the plan's local steps, on the datasets of the job this site holds; its update goes through the
gate (:mod:`enclave._round_steps`) and is kept here for the round's secure aggregation
(:class:`enclave.federated.Participant`). The site's round record
(:class:`enclave.federated.RoundBook`) bounds what any gateway can ask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enclave import _channels, signatures, sovereignty
from enclave._release_steps import (
    gate_each,
    memorization_inputs,
    release_form,
    release_layout,
    training_rows,
)
from enclave.contract import Report, RoundOrder, RoundUpdate, RunOrder, SiteReport
from enclave.federated import MAX_ROUND_WEIGHT, RoundBook
from enclave.identity import IdentityFiles
from enclave.models import ModelStore
from enclave.provenance.federated import Countersign, countersign_message
from enclave.provenance.verify import hash_file
from enclave.vault import Vault
from policies import document
from policies.errors import IntegrityError, InvalidInput, InvalidState, ReleaseRefused, SiteError
from policies.federation import FEDERATED_TRAINERS
from policies.release import MANDATORY_CHECKS, CheckName
from trainers import rounds as model_rounds
from trainers.contract import DPParameters
from trainers.errors import WeightsError
from trainers.release import expected_release
from trainers.weights import WEIGHTS_FILE, TensorLayout

ROUND_DELTA = 1e-5
"""The δ a round's ε is reported at when no held dataset's policy sets one."""


def _dp_limits(policies: Mapping[str, document.PolicyDocument]) -> tuple[float, float]:
    """The per-job ε cap and the δ a federated job is accounted at here: the tightest of the
    held datasets' DP rules (no cap where none has any)."""
    rules = [d.release.dp for d in policies.values() if d.release.dp is not None]
    if not rules:
        return math.inf, ROUND_DELTA
    return min(r.max_epsilon_per_job for r in rules), min(r.delta for r in rules)


def round_run_id(job: str, round_no: int) -> str:
    """The id of one round's run at a site: what its audit records and its container carry."""
    return f"{job}-round-{round_no}"


class RoundRuns:
    """The federated half of :class:`enclave.agent.SiteAgent` (which provides what is declared
    here)."""

    name: str
    owners: sovereignty.Owners
    vault: Vault
    models: ModelStore
    signer: IdentityFiles
    rounds: RoundBook
    _runs: Path
    _lock: threading.Lock
    _kept: dict[tuple[str, int], RoundUpdate]
    _training: dict[tuple[str, int], threading.Event]
    _handles: dict[str, Any]
    _dp: dict[str, DPParameters | None]
    _run: Callable[..., SiteReport | RoundUpdate | None]  # one run (or round) of a job

    def train_round(self, rnd: RoundOrder, report: Report) -> RoundUpdate | None:
        """Train one round of a federated job on the order's datasets this site holds, from the
        round's start, and gate its update; keep the update here and return it. A round this
        site trained already returns the update it kept (no new training, no new privacy cost).
        None when the round ended without an update (the job failed, the gate refused it, it
        was cancelled): why is audited here and told to the owners (``detail``); the team
        learns only that this site is not in the round's sum. Reports carry the round's run
        id (``JOB.rN``) and no team-facing state or progress: the team sees the round's
        aggregate, from the gateway. Raises :class:`PolicyViolation` for a round the owners'
        plan or this site's ε does not allow, before the job runs."""
        key = (rnd.order.job_id, rnd.round)
        with self._lock:
            kept = self._kept.get(key)
            busy = self._training.get(key)
            if kept is None and busy is None:
                self._training[key] = threading.Event()
        if kept is not None:
            return kept
        if busy is not None:
            # The same round asked again while it trains (a gateway that restarted meanwhile
            # asks afresh): one training, whose update both answers get.
            busy.wait()
            with self._lock:
                return self._kept.get(key)
        try:
            return self._train_round(rnd, report)
        finally:
            with self._lock:
                self._training.pop(key).set()

    def _train_round(self, rnd: RoundOrder, report: Report) -> RoundUpdate | None:
        job, key = rnd.order.job_id, (rnd.order.job_id, rnd.round)
        run_id = round_run_id(job, rnd.round)
        rounds_dir = self._runs / f"{job}.rounds"
        rounds_dir.mkdir(mode=0o700, exist_ok=True)
        run_dir = rounds_dir / f"r{rnd.round}"
        rec = self.rounds.job(job)
        if run_dir.exists() and (rec is None or rnd.round not in rec.trained):
            # An earlier try of this round was refused before it trained (its record says so):
            # nothing of a job ran in it, and its mounts went with that try.
            shutil.rmtree(run_dir)

        def owners_only(r: SiteReport) -> None:
            # The run's audit records and the owners' progress; no state or point of the team's.
            if r.audit_action or r.owner_progress is not None:
                report(
                    dataclasses.replace(
                        r, state=None, reason="", progress=None, channel_bits=None, image_id=""
                    )
                )

        team = _channels.OwnersChannel(run_id, report=owners_only)
        try:
            policies = sovereignty.order_policies(rnd.order)
            outcome = self._run(rnd.order, owners_only, run_dir, team, policies, rnd=rnd)
        finally:
            with self._lock:
                self._handles.pop(job, None)
                self._dp.pop(job, None)
        if isinstance(outcome, RoundUpdate):
            with self._lock:
                self._kept[key] = outcome
            report(SiteReport(run_id, audit_action="round.update", details={"round": rnd.round}))
            return outcome
        if outcome is not None:
            report(
                SiteReport(
                    run_id,
                    detail=outcome.detail,
                    audit_action="round.left-out",
                    audit_outcome="denied",
                    details={
                        "round": rnd.round,
                        "state": str(outcome.state),
                        "why": outcome.detail,
                    },
                )
            )
        return None

    def round_layout(self, order: RunOrder) -> tuple[TensorLayout, bytes]:
        """The layout of the job's update (the release's names and shapes, in F32:
        :func:`trainers.rounds.round_layout`) and its release's config, from this site's base
        model and the approved spec (no data read). Raises :class:`InvalidInput` for a job whose
        trainer has no federated form, or a whole model whose base is sharded (not composed
        yet)."""
        spec = order.spec
        if spec.trainer not in FEDERATED_TRAINERS:
            raise InvalidInput(f"trainer {spec.trainer!r} has no federated round")
        model_dir = self.models.get(spec.base_model).path
        if model_rounds.whole_model(spec.trainer) and not (model_dir / WEIGHTS_FILE).is_file():
            raise InvalidInput(
                f"base model {spec.base_model!r} is sharded: a federated {spec.trainer} job "
                "needs its weights in one file"
            )
        expected = expected_release(spec.trainer, dict(spec.hyperparameters), model_dir=model_dir)
        return model_rounds.round_layout(expected.layout), expected.config or b""

    def countersign(self, order: RunOrder, final: Path, report: Report, dest: Path) -> Countersign:
        """Probe the job's final model (``final``: the global adapter, or a whole model's
        global difference, composed here with the base into the release) for memorization of
        this site's data (each held dataset's rules), then countersign it and write it to
        ``dest`` (the release's weights): its hash, the held dataset versions, the rounds
        this site trained and the ε they cost it. Raises :class:`ReleaseRefused` naming the
        dataset when the probe refuses (the checks audited here), :class:`InvalidState` when
        this site trained no round of the job."""
        job = order.job_id
        rec = self.rounds.job(job)
        if rec is None or not rec.trained:
            raise InvalidState(f"job {job}: this site trained none of its rounds")
        run_id = f"{job}-final"
        run_dir = self._runs / f"{job}.rounds" / "final"
        shutil.rmtree(run_dir, ignore_errors=True)  # a repeat of the probe starts afresh
        gate_in = run_dir / "in" / "weights"
        gate_in.mkdir(parents=True, mode=0o700)
        held = self._held(order, federated=True)
        mine = {n: d for n, d in sovereignty.order_policies(order).items() if n in dict(held)}
        model = self.models.get(order.spec.base_model)
        versions = [self.vault.get(n, v) for n, v in held]
        form = release_form(order, report, self.vault, model.path, versions, code_dir=None)
        if form is None:
            raise SiteError("a federated job runs a built-in trainer: it has a release form")
        released = gate_in / "model.safetensors"
        if not model_rounds.whole_model(order.spec.trainer):  # the global adapter is it
            shutil.copyfile(final, released)
        else:  # a whole model: the base plus the global difference
            try:
                model_rounds.compose(
                    final, release=release_layout(form), model_dir=model.path, dest=released
                )
            except WeightsError as e:
                raise IntegrityError(f"the final global model is not usable: {e}") from e
        probe = MANDATORY_CHECKS | {CheckName.MEMORIZATION}
        gates = gate_each(
            run_id,
            report,
            gate_in.parent,
            [
                (dataset, dataclasses.replace(doc.release, checks=probe))
                for dataset, doc in sorted(mine.items())
                if CheckName.MEMORIZATION in doc.release.checks
            ],
            layout=model.layout,
            form=form,
            run_dir=run_dir,
            # No DP check here: the rounds' gates had theirs.
            memorization=lambda dataset: memorization_inputs(
                run_id, report, self.vault, model.path, versions, dataset
            ),
        )
        for dataset, result in sorted(gates.items()):
            if not result.passed:
                raise ReleaseRefused(f"the final model fails the release checks of {dataset}")
        _, delta = _dp_limits(mine)
        epsilon = rec.epsilon(delta=delta)
        shown = None if math.isinf(epsilon) else epsilon
        digest, _ = hash_file(released)
        message = countersign_message(
            job_id=job,
            model_sha256=digest,
            site=self.name,
            datasets=dict(held),
            rounds=len(rec.trained),
            epsilon=shown,
        )
        signature = signatures.sign(self.signer.key.read_bytes(), message)
        report(
            SiteReport(
                run_id,
                audit_action="federated.countersign",
                details={"model_sha256": digest, "rounds": len(rec.trained), "epsilon": shown},
            )
        )
        shutil.copyfile(released, dest)
        return Countersign(
            self.name, dict(held), len(rec.trained), shown, self.signer.cert.read_text(), signature
        )

    def _owners_for(self, order: RunOrder, held: list[tuple[str, int]]) -> sovereignty.Owners:
        """Whose approval each dataset of ``order`` needs: this site's own record for the
        datasets it holds; for a federated job's datasets held at other sites, the owner the
        order names (their signatures are still checked against the CA; each of those sites
        checks its own record)."""
        mine = {n for n, _ in held}

        def owner(dataset: str) -> str | None:
            if dataset in mine or not order.spec.is_federated:
                return self.owners(dataset)
            return order.dataset_owners.get(dataset)

        return owner

    def _held(self, order: RunOrder, *, federated: bool) -> list[tuple[str, int]]:
        """The order's dataset versions this site runs on: all of them (a version it does not
        hold is an error further on), or for a federated job those it holds."""
        if not federated:
            return list(order.datasets)
        held = [(n, v) for n, v in order.datasets if n in self.vault.datasets()]
        if not held:
            raise InvalidInput("this site holds none of the federated job's datasets")
        return held

    def _round_start(self, rnd: RoundOrder, run_dir: Path) -> Path:
        """The round's start, copied into the run and checked against its digest."""
        start_dir = run_dir / "start"
        start_dir.mkdir(mode=0o755)
        dest = start_dir / "model.safetensors"
        shutil.copyfile(rnd.start, dest)
        dest.chmod(0o644)
        if hashlib.sha256(dest.read_bytes()).hexdigest() != rnd.start_sha256:
            raise IntegrityError("the round's start does not match its digest")
        return start_dir

    def _admit_round(
        self,
        rnd: RoundOrder,
        dp: DPParameters | None,
        mine: Mapping[str, document.PolicyDocument],
    ) -> None:
        plan = rnd.order.spec.federation
        if plan is None:
            raise InvalidInput("a round of a job that is not federated")
        cap, delta = _dp_limits(mine)
        trains = self.rounds.train(
            rnd.order.job_id,
            rnd.round,
            local_steps=plan.local_steps,
            planned_rounds=plan.rounds,
            dp=dp,
            max_epsilon=cap,
            delta=delta,
        )
        if not trains:  # trained before this site restarted: the kept update went with it
            raise SiteError(f"round {rnd.round} was trained here before a restart; not again")

    def _round_epsilon(self, job: str, mine: Mapping[str, document.PolicyDocument]) -> float:
        rec = self.rounds.job(job)
        _, delta = _dp_limits(mine)
        return math.inf if rec is None else rec.epsilon(delta=delta)

    def _round_weight(
        self, order: RunOrder, report: Report, model_dir: Path, versions: list[Any]
    ) -> int:
        """The round's FedAvg weight: the training samples this site holds (never more than
        the sum can carry). It goes only into the masked sum."""
        rows = training_rows(
            order, report, self.vault, model_dir, versions, purpose="FedAvg weight"
        )
        plan = order.spec.federation
        if plan is not None and plan.weight_by == "tokens":
            rows *= int(order.spec.hyperparameters.get("block_size", 64))
        return max(1, min(rows, MAX_ROUND_WEIGHT))
