"""A site's part in the rounds of a federated job: it trains each round (through the site's
``train``: the container, then the gate), then takes part in the round's secure aggregation
with the update it kept, signing with its CA-issued release-signing identity.

Before it trains, it checks the round's settings against the plan every owner approved: the
gateway chooses who takes part, but it cannot make a sum smaller than the plan's ``min_sites``,
clip at another bound, or sum a round under another job's name. Its rounds' secrets are held in
memory only; a site that restarts mid-round drops out of that round.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from enclave import signatures
from enclave.contract import Report, RoundOrder, RoundUpdate, RunOrder, SiteReport
from enclave.federated._rounds import RoundBook
from enclave.federated._update import update_layout, update_length
from enclave.identity import IdentityFiles
from enclave.provenance.federated import Countersign
from enclave.secagg import Advert, Reveal, RoundConfig, SiteRound
from policies.errors import InvalidState, PolicyViolation
from policies.identity import Role
from trainers.weights import TensorLayout

Train = Callable[[RoundOrder, Report], RoundUpdate | None]
Layout = Callable[[RunOrder], tuple[TensorLayout, bytes]]
Finish = Callable[[RunOrder, Path, Report, Path], Countersign]


class RoundSite(Protocol):
    """A site as a federated job's coordinator sees it; :class:`Participant` is the in-process
    one. Steps of a round are called in order (``join``, ``share``, ``mask``, ``confirm``,
    ``reveal``), each once; any of them may raise when the site cannot go on, which leaves it
    out of the round (never out of the job). ``forget`` drops a round's secrets, any time."""

    name: str

    def round_layout(self, order: RunOrder) -> tuple[TensorLayout, bytes]: ...

    def join(self, rnd: RoundOrder, config: RoundConfig, report: Report) -> Advert | None: ...

    def share(self, job: str, round_no: int, adverts: Mapping[str, Advert]) -> dict[str, bytes]: ...

    def mask(self, job: str, round_no: int, inbox: Mapping[str, bytes]) -> np.ndarray: ...

    def confirm(self, job: str, round_no: int, survivors: tuple[str, ...]) -> str: ...

    def reveal(
        self,
        job: str,
        round_no: int,
        survivors: tuple[str, ...],
        confirmations: Mapping[str, str],
    ) -> Reveal: ...

    def forget(self, job: str, round_no: int) -> None: ...

    def countersign(
        self, order: RunOrder, final: Path, report: Report, dest: Path
    ) -> Countersign: ...


class Participant:
    """The secure-aggregation side of one site, for every federated job it takes part in."""

    def __init__(
        self,
        *,
        name: str,
        train: Train,
        layout: Layout,
        finish: Finish,
        rounds: RoundBook,
        identity: IdentityFiles,
    ) -> None:
        self.name = name
        self._train = train
        self._layout = layout
        self._finish = finish
        self._book = rounds
        self._cert, self._key, self._ca = identity.read()
        self._lock = threading.Lock()
        self._live: dict[tuple[str, int], tuple[SiteRound, RoundUpdate]] = {}

    def round_layout(self, order: RunOrder) -> tuple[TensorLayout, bytes]:
        """What an update of ``order``'s job is here (its tensors' layout) and the adapter
        config released with it: from the site's base model and the approved spec, no data."""
        return self._layout(order)

    def join(self, rnd: RoundOrder, config: RoundConfig, report: Report) -> Advert | None:
        """Train the round (or take the update kept from an earlier try of it) and return this
        site's signed round keys; None when the round left this site out (see ``train``).
        Raises :class:`PolicyViolation` for settings the approved plan does not allow."""
        self._check(rnd, config)
        update = self._train(rnd, self._tagged(report, rnd.order.job_id))
        if update is None:
            return None
        state = SiteRound(
            config,
            site=self.name,
            cert_pem=self._cert.decode(),
            sign=lambda m: signatures.sign(self._key, m),
            verify=self._verify,
        )
        advert = state.advertise()
        with self._lock:
            self._live[(rnd.order.job_id, rnd.round)] = (state, update)
        return advert

    def share(self, job: str, round_no: int, adverts: Mapping[str, Advert]) -> dict[str, bytes]:
        return self._state(job, round_no)[0].share(adverts)

    def mask(self, job: str, round_no: int, inbox: Mapping[str, bytes]) -> np.ndarray:
        state, update = self._state(job, round_no)
        self._book.mask(job, round_no)  # recorded first: this update goes into no second sum
        return state.mask(inbox, update.vector, update.weight)

    def confirm(self, job: str, round_no: int, survivors: tuple[str, ...]) -> str:
        return self._state(job, round_no)[0].confirm(survivors)

    def reveal(
        self,
        job: str,
        round_no: int,
        survivors: tuple[str, ...],
        confirmations: Mapping[str, str],
    ) -> Reveal:
        out = self._state(job, round_no)[0].reveal(survivors, confirmations)
        self.forget(job, round_no)
        return out

    def countersign(self, order: RunOrder, final: Path, report: Report, dest: Path) -> Countersign:
        """The memorization probe of the job's final model on this site's data, then this
        site's countersignature of it (see the site's ``countersign``)."""
        return self._finish(order, final, self._tagged(report, order.job_id), dest)

    def _tagged(self, report: Report, job: str) -> Report:
        """``report``, for the reports of one round's run (or the final probe's): each said
        of the job, from this site (:func:`_as_job`)."""
        return lambda r: report(_as_job(r, job, self.name))

    def forget(self, job: str, round_no: int) -> None:
        """Drop a round's secrets (after its reveal, or when the gateway gave it up)."""
        with self._lock:
            self._live.pop((job, round_no), None)

    def _state(self, job: str, round_no: int) -> tuple[SiteRound, RoundUpdate]:
        with self._lock:
            live = self._live.get((job, round_no))
        if live is None:
            raise InvalidState(f"job {job}: this site is not in round {round_no}'s aggregation")
        return live

    def _check(self, rnd: RoundOrder, config: RoundConfig) -> None:
        plan = rnd.order.spec.federation
        if plan is None:
            raise PolicyViolation("a round of a job with no federation plan")
        problems = []
        if (config.job_id, config.round) != (rnd.order.job_id, rnd.round):
            problems.append("it is another job's or another round's aggregation")
        if self.name not in config.members:
            problems.append("this site is not among its members")
        if config.min_survivors < plan.min_sites:
            problems.append(f"it would sum fewer than the plan's {plan.min_sites} sites")
        if config.clip != plan.update_clip:
            problems.append(f"it clips at {config.clip}, the plan at {plan.update_clip}")
        if config.length != update_length(update_layout(rnd.start)) + 1:
            problems.append("its length is not the round's update and loss")
        if problems:
            raise PolicyViolation(f"round {rnd.round}'s aggregation: " + "; ".join(problems))

    def _verify(self, site: str, cert_pem: str, message: bytes, signature: str) -> None:
        signatures.verify(
            cert_pem=cert_pem,
            signature=signature,
            message=message,
            ca_cert_pem=self._ca,
            name=site,
            role=Role.SITE,
            what=f"secure aggregation: {site}'s statement",
        )


def _as_job(report: SiteReport, job_id: str, site: str) -> SiteReport:
    """A round's report as the federated job's, from ``site``: the audit records carry the job
    (the round's run is named in the details), so the gateway files them under the job."""
    if report.job_id == job_id:
        return dataclasses.replace(report, site=site)
    details = {**report.details, "run": report.job_id}
    return dataclasses.replace(report, job_id=job_id, site=site, details=details)
