"""The gateway's side of a federated job: it runs the plan round by round across the sites that
hold the job's datasets, relays each round's secure aggregation, and keeps the global model.

Each round: every site trains from the round's start and gates its update at home
(:meth:`enclave.federated.RoundSite.join`); the gateway relays the aggregation's messages
(:class:`enclave.secagg.Aggregator`) and learns only the weighted mean of the survivors'
updates and losses; the next start is this start plus that mean (FedAvg; a FedProx plan differs
only in the sites' training). A round with fewer than the plan's ``min_sites`` in its sum is
tried once more (sites whose update went into a sum already sit the retry out); then the job
fails, with the reason. The team sees the round and the mean loss (coarse), each published on
the job's time grid (:class:`OnGrid`); never which site did what, nor how many were in a sum.

Each round's start is kept under ``<home>/federated/<job>/`` with a journal of the rounds done,
so the job's history (and, on a restart, where it stopped) is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from enclave.contract import Report, RoundOrder, RunOrder, SiteReport
from enclave.federated import (
    MAX_ROUND_WEIGHT,
    RoundSite,
    apply_mean,
    initial_start,
    split_mean,
    update_layout,
    update_length,
)
from enclave.identity import IdentityFiles
from enclave.linkwire import order_from_json, order_json
from enclave.provenance.federated import write_federated_release
from enclave.secagg import Aggregator, RoundConfig
from enclave.secretfile import write_secret
from policies import channels
from policies.errors import InvalidState, ReleaseRefused, SealroomError, SiteError
from trainers.release import release_names

log = logging.getLogger(__name__)

ORDER_FILE = "order.json"
DONE_FILE = "done"
ATTEMPTS = 2
T = TypeVar("T")


@dataclass(frozen=True)
class RoundResult:
    round: int
    sites: int
    loss: float
    start_sha256: str
    model_sha256: str
    survivors: tuple[str, ...] = ()


class FederatedJob:
    """One federated job, run to its last round by :meth:`run`."""

    def __init__(
        self,
        order: RunOrder,
        report: Report,
        *,
        sites: Mapping[str, RoundSite],
        home: Path,
        loss_digits: int = 2,
    ) -> None:
        if order.spec.federation is None:
            raise InvalidState("not a federated job")
        self.order, self.plan = order, order.spec.federation
        self._report = report
        self.sites = dict(sorted(sites.items()))
        self.home = home / order.job_id
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._loss_digits = loss_digits
        self.history: list[RoundResult] = []
        self._refusals: dict[str, str] = {}  # the last error class of each site left out
        self.config = b""  # the release's config file, as the sites gave it
        self._load_journal()
        if not (self.home / ORDER_FILE).exists():  # what a restarted gateway resumes from
            write_secret(self.home / ORDER_FILE, order_json(order).encode())

    @staticmethod
    def unfinished(home: Path) -> list[str]:
        """Jobs under ``home`` whose rounds or release a previous process did not finish."""
        if not home.is_dir():
            return []
        return sorted(
            p.name
            for p in home.iterdir()
            if (p / ORDER_FILE).is_file() and not (p / DONE_FILE).exists()
        )

    @staticmethod
    def saved_order(home: Path, job_id: str) -> RunOrder:
        """The order a previous process started ``job_id`` with."""
        return order_from_json((home / job_id / ORDER_FILE).read_text(), bundle=None)

    def finished(self) -> None:
        """Mark the job done here (released, refused or failed): nothing to resume."""
        (self.home / DONE_FILE).touch()

    def release(self, final: Path, *, signer: IdentityFiles) -> Path:
        """Have every site that was in a round's sum probe the final model on its data and
        countersign it, then write the release signed by the gateway (``signer``); return its
        directory. Raises :class:`ReleaseRefused` when a site's probe refuses, and
        :class:`SiteError` when a site that trained cannot countersign."""
        needed = sorted({s for h in self.history for s in h.survivors})
        models = self.home / "countersigned"
        shutil.rmtree(models, ignore_errors=True)
        models.mkdir(mode=0o700)
        signed = self._each(
            lambda s: s.countersign(
                self.order, final, self._site_report, models / f"{s.name}.safetensors"
            ),
            self._of(tuple(needed)),
        )
        missing = [s for s in needed if s not in signed]
        if missing:
            refused = [s for s in missing if self._refusals.get(s) == "ReleaseRefused"]
            if refused:
                raise ReleaseRefused(
                    f"the final model fails the release checks at {', '.join(refused)}"
                )
            raise SiteError(f"sites {', '.join(missing)} could not countersign the final model")
        cert, key, ca = signer.read()
        dest = self.home / "release"
        shutil.rmtree(dest, ignore_errors=True)
        last = self.history[-1]
        weights_name, config_name = release_names(self.order.spec.trainer)
        write_federated_release(
            dest,
            job_id=self.order.job_id,
            spec_sha256=self.order.spec_sha256,
            approval_binding=self.order.approval_binding,
            # The model the sites signed: the global adapter, or a whole model the sites
            # composed from their base and the global difference (the gateway holds no base).
            # Whichever copy most sites sent; every site's signature is checked against it.
            weights=(weights_name, _most_sent([models / f"{s}.safetensors" for s in signed])),
            config=None if config_name is None else (config_name, self.config),
            metrics={"train_loss": _significant(last.loss, 4), "rounds": float(len(self.history))},
            # How many sites were in each sum, and each round's model, stay with the owners
            # (the journal, the audit): a count the data could steer, or 256 bits of a model
            # the team never receives (an oracle for a guess at the data), is not the team's.
            rounds=[{"round": h.round} for h in self.history],
            sites=list(signed.values()),
            gateway_cert_pem=cert,
            gateway_key_pem=key,
            ca_cert_pem=ca,
        )
        return dest

    def run(self) -> Path:
        """Run every round; return the final global model (``final.safetensors``). Raises
        :class:`InvalidState` naming the round when too few sites could take part."""
        start = (
            self._first_start()
            if not self.history
            else self.home / f"round-{len(self.history)}.safetensors"
        )
        for r in range(len(self.history), self.plan.rounds):
            result, start = self._round(r, start)
            self.history.append(result)
            self._journal()
            self._report(
                SiteReport(
                    self.order.job_id,
                    progress=(
                        r + 1,
                        self.plan.rounds,
                        channels.coarse_loss(result.loss, self._loss_digits),
                    ),
                    owner_progress=(r + 1, self.plan.rounds, result.loss),
                    audit_action="federated.round",
                    details={
                        "round": r,
                        "sites": result.sites,
                        "start_sha256": result.start_sha256,
                        "model_sha256": result.model_sha256,
                    },
                )
            )
        final = self.home / "final.safetensors"
        final.write_bytes(start.read_bytes())
        return final

    # -- one round ---------------------------------------------------------------------------

    def _first_start(self) -> Path:
        """Round 0's start, from the update layout every site agrees on."""
        answers = self._each(lambda s: s.round_layout(self.order), list(self.sites.values()))
        layouts = {json.dumps(sorted(a[0].items()), default=list) for a in answers.values()}
        if len(answers) != len(self.sites) or len(layouts) != 1:
            raise InvalidState(
                "the sites do not agree on what the job's update is (their base models differ)"
            )
        layout, self.config = next(iter(answers.values()))
        seed = int(self.order.spec.hyperparameters.get("seed", 0))
        start = self.home / "round-0.safetensors"
        initial_start(self.order.spec.trainer, layout, seed=seed, dest=start)
        return start

    def _round(self, r: int, start: Path) -> tuple[RoundResult, Path]:
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        rnd = RoundOrder(self.order, r, start, digest)
        why = ""
        for attempt in range(ATTEMPTS):
            try:
                mean, loss, sites = self._aggregate(rnd, attempt)
            except InvalidState as e:
                why = str(e)
                log.info("job %s round %d attempt %d: %s", self.order.job_id, r, attempt, e)
                continue
            finally:
                self._forget(r)
            nxt = self.home / f"round-{r + 1}.safetensors"
            apply_mean(start, mean, nxt)
            model = hashlib.sha256(nxt.read_bytes()).hexdigest()
            return RoundResult(r, len(sites), loss, digest, model, sites), nxt
        raise InvalidState(f"round {r}: {why}")

    def _aggregate(self, rnd: RoundOrder, attempt: int) -> tuple[Any, float, tuple[str, ...]]:
        job, r = self.order.job_id, rnd.round
        members = tuple(self.sites)
        n = len(members)
        threshold = n // 2 + 1
        config = RoundConfig(
            job_id=job,
            round=r,
            members=members,
            threshold=threshold,
            min_survivors=max(self.plan.min_sites, threshold),
            length=update_length(update_layout(rnd.start)) + 1,
            clip=self.plan.update_clip,
            max_weight=MAX_ROUND_WEIGHT,
            attempt=attempt,
        )
        agg = Aggregator(config)
        joined = self._each(lambda s: s.join(rnd, config, self._site_report), self._all())
        adverts = agg.adverts({m: a for m, a in joined.items() if a is not None})
        self._enough(config, adverts, "trained and passed their gate")
        sealed = self._each(lambda s: s.share(job, r, adverts), self._of(adverts))
        inbox = agg.route(sealed)
        self._enough(config, inbox, "shared their keys")
        masked = self._each(lambda s: s.mask(job, r, inbox[s.name]), self._of(inbox))
        survivors = agg.survivors(masked)
        signed = self._each(lambda s: s.confirm(job, r, survivors), self._of(survivors))
        reveals = self._each(lambda s: s.reveal(job, r, survivors, signed), self._of(signed))
        mean, _ = agg.unmask(reveals)
        update, loss = split_mean(mean, clip=config.clip)
        return update, loss, survivors

    def _load_journal(self) -> None:
        """The rounds a previous process completed (a restarted gateway goes on from there)."""
        path = self.home / "journal.json"
        if not path.is_file():
            return
        body = json.loads(path.read_bytes())
        self.config = str(body["config"]).encode()
        self.history = [
            RoundResult(**{**r, "survivors": tuple(r["survivors"])}) for r in body["rounds"]
        ]

    def _enough(self, config: RoundConfig, got: Mapping[str, Any], what: str) -> None:
        if len(got) < config.min_survivors:
            raise InvalidState(
                f"{len(got)} of {len(config.members)} sites {what}; the plan needs "
                f"{config.min_survivors} in each sum"
            )

    # -- calling the sites -------------------------------------------------------------------

    def _all(self) -> list[RoundSite]:
        return list(self.sites.values())

    def _of(self, names: Mapping[str, Any] | tuple[str, ...]) -> list[RoundSite]:
        return [self.sites[n] for n in names]

    def _each(self, call: Callable[[RoundSite], T], sites: list[RoundSite]) -> dict[str, T]:
        """``call`` on every site at once; a site that raises is left out (and logged)."""
        out: dict[str, T] = {}
        if not sites:
            return out
        with ThreadPoolExecutor(max_workers=len(sites)) as pool:
            futures = {s.name: pool.submit(call, s) for s in sites}
            for name, future in futures.items():
                try:
                    out[name] = future.result()
                except SealroomError as e:
                    log.info("job %s: site %s left out: %s", self.order.job_id, name, e)
                    self._refusals[name] = type(e).__name__
                    self._site_report(
                        SiteReport(
                            self.order.job_id,
                            site=name,
                            audit_action="federated.left-out",
                            audit_outcome="denied",
                            details={"error": type(e).__name__, "message": str(e)},
                        )
                    )
        return out

    def _forget(self, r: int) -> None:
        for site in self.sites.values():
            with contextlib.suppress(SealroomError):
                site.forget(self.order.job_id, r)

    def _site_report(self, report: SiteReport) -> None:
        """What a site tells of its round: audit records and owner progress only."""
        if report.state is None and report.progress is None:
            self._report(report)

    def _journal(self) -> None:
        body = {
            "job_id": self.order.job_id,
            "config": self.config.decode(),
            "rounds": [{**vars(h), "survivors": list(h.survivors)} for h in self.history],
        }
        write_secret(self.home / "journal.json", json.dumps(body, indent=1).encode())


def _significant(value: float, digits: int) -> float:
    """``value`` to ``digits`` significant digits (what a release's metrics carry)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


class OnGrid:
    """A federated job's publications: what the team sees (its states and one point a round)
    each at the first grid point of the job's time quantum after it is known, in order, as a
    site publishes a job's (``enclave._channels.TeamChannel``); audit records and the owners'
    progress at once. :meth:`close` waits until all is published."""

    def __init__(
        self,
        report: Report,
        *,
        quantum_s: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._report, self._quantum = report, quantum_s
        self._clock, self._sleep = clock, sleep
        self._queue: queue.Queue[tuple[float, SiteReport] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._publish, name="federated-grid", daemon=True)
        self._thread.start()

    def __call__(self, r: SiteReport) -> None:
        if r.state is None and r.progress is None:
            self._report(r)
            return
        if r.audit_action or r.owner_progress is not None:  # the owners' part, now
            self._report(dataclasses.replace(r, state=None, reason="", progress=None))
            r = dataclasses.replace(r, audit_action="", owner_progress=None, details={})
        self._queue.put((channels.next_tick(self._clock(), self._quantum), r))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _publish(self) -> None:
        while (item := self._queue.get()) is not None:
            due, r = item
            while (left := due - self._clock()) > 0:
                self._sleep(left)
            self._report(r)


def _most_sent(copies: list[Path]) -> Path:
    """The copy whose bytes most of ``copies`` hold (the first of them on a tie)."""
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in copies]
    best = max(digests, key=digests.count)
    return copies[digests.index(best)]
