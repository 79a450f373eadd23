"""Federated rounds with remote sites: the gateway cannot call a site (the site dials out), so
each step of a round for a remote site is put in that site's mailbox, taken by the site's long
poll (``PullRound``), and answered (``AnswerRound``); :class:`RemoteRoundSite` is the
:class:`enclave.federated.RoundSite` a federated job's coordinator calls, over the mailbox.

A step is given out once. One the site does not answer in time is withdrawn and the call raises
:class:`SiteError`, which leaves the site out of that round (the coordinator's rule for any
site that cannot go on). A site's refusal comes back as the error it raised at the site.
"""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enclave.contract import Report, RoundOrder, RunOrder
from enclave.federated import _wire as wire
from enclave.linkwire import order_json
from enclave.provenance.federated import Countersign
from enclave.secagg import Advert, Reveal, RoundConfig
from policies import errors
from policies.errors import InvalidState, SealroomError, SiteError
from trainers.weights import TensorLayout

STEP_TIMEOUT_S = 120.0
"""How long a step other than ``join`` (which trains) may take to be answered."""
JOIN_MARGIN_S = 300.0
FORGET = "forget"
"""What a ``join`` may take beyond the job's own timeout: staging, the gate, the link."""

_ERRORS: dict[str, type[SealroomError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidInput,
        errors.PolicyViolation,
        errors.InvalidState,
        errors.IntegrityError,
        errors.SignatureError,
        errors.PermissionDenied,
        errors.SiteError,
    )
}


@dataclass
class Step:
    step_id: str
    site: str
    kind: str
    job_id: str
    round: int
    payload: bytes
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    error_kind: str = ""
    answer: bytes = b""


class RoundMailbox:
    """The steps waiting for each remote site, and those given out and not yet answered."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque[Step]] = collections.defaultdict(
            collections.deque
        )
        self._given: dict[str, Step] = {}

    def call(
        self, site: str, kind: str, job_id: str, round_no: int, payload: bytes, *, timeout_s: float
    ) -> bytes:
        """Put a step for ``site`` and wait for its answer. Raises the site's error, or
        :class:`SiteError` when it is not answered within ``timeout_s``."""
        step = Step(uuid.uuid4().hex, site, kind, job_id, round_no, payload)
        with self._cond:
            self._waiting[site].append(step)
            self._cond.notify_all()
        if not step.done.wait(timeout_s):
            with self._cond:
                if step in self._waiting[site]:
                    self._waiting[site].remove(step)
                self._given.pop(step.step_id, None)
            raise SiteError(
                f"site {site} did not answer the {kind} step of round {round_no} within "
                f"{timeout_s:g} s"
            )
        if step.error:
            raise _ERRORS.get(step.error_kind, SiteError)(f"site {site}: {step.error}")
        return step.answer

    def pull(self, site: str, *, wait_s: float) -> Step | None:
        """The next step for ``site``, waiting up to ``wait_s``; None when there is none."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._waiting[site]), timeout=wait_s):
                return None
            step = self._waiting[site].popleft()
            if step.kind != FORGET:  # a forget is told, never answered
                self._given[step.step_id] = step
            return step

    def post(self, site: str, kind: str, job_id: str, round_no: int, payload: bytes) -> None:
        """Put a step for ``site`` that expects no answer."""
        with self._cond:
            self._waiting[site].append(
                Step(uuid.uuid4().hex, site, kind, job_id, round_no, payload)
            )
            self._cond.notify_all()

    def answer(
        self, site: str, step_id: str, *, error: str, error_kind: str, payload: bytes
    ) -> None:
        """Hand a site's answer to the waiting call. Raises :class:`InvalidState` for a step
        this site was not given, or whose answer came already."""
        with self._cond:
            step = self._given.get(step_id)
            if step is None or step.site != site:
                raise InvalidState("an answer to a round step this site was not given")
            del self._given[step_id]
        step.error, step.error_kind, step.answer = error, error_kind, payload
        step.done.set()


class RemoteRoundSite:
    """A remote site's part in federated rounds, reached through its mailbox."""

    def __init__(self, name: str, mailbox: RoundMailbox) -> None:
        self.name = name
        self._box = mailbox
        self._lengths: dict[tuple[str, int], int] = {}

    def _call(
        self,
        kind: str,
        job: str,
        r: int,
        doc: Mapping[str, object],
        blob: bytes = b"",
        *,
        timeout_s: float = STEP_TIMEOUT_S,
    ) -> tuple[dict[str, object], bytes]:
        answer = self._box.call(self.name, kind, job, r, wire.pack(doc, blob), timeout_s=timeout_s)
        return wire.unpack(answer)

    def round_layout(self, order: RunOrder) -> tuple[TensorLayout, bytes]:
        doc, _ = self._call("layout", order.job_id, -1, {"order": order_json(order)})
        return wire.layout_value(doc.get("layout")), wire.unb64(doc.get("config"), "config")

    def join(self, rnd: RoundOrder, config: RoundConfig, report: Report) -> Advert | None:
        job = rnd.order.job_id
        self._lengths[(job, rnd.round)] = config.length
        doc, _ = self._call(
            "join",
            job,
            rnd.round,
            {
                "order": order_json(rnd.order),
                "config": wire.config_doc(config),
                "start_sha256": rnd.start_sha256,
            },
            rnd.start.read_bytes(),
            timeout_s=rnd.order.spec.resources.timeout_s + JOIN_MARGIN_S,
        )
        for r in wire.reports_value(doc.get("reports", []), site=self.name):
            report(r)
        raw = doc.get("advert")
        return None if raw is None else wire.advert_value(raw)

    def share(self, job: str, round_no: int, adverts: Mapping[str, Advert]) -> dict[str, bytes]:
        doc, _ = self._call(
            "share", job, round_no, {"adverts": {k: wire.advert_doc(a) for k, a in adverts.items()}}
        )
        return wire.boxes_value(doc.get("sealed"), "sealed shares")

    def mask(self, job: str, round_no: int, inbox: Mapping[str, bytes]) -> np.ndarray:
        length = self._lengths.get((job, round_no))
        if length is None:
            raise InvalidState(f"job {job}: {self.name} did not join round {round_no}")
        _, blob = self._call("mask", job, round_no, {"inbox": wire.boxes_doc(inbox)})
        return wire.words(blob, length + 1)

    def confirm(self, job: str, round_no: int, survivors: tuple[str, ...]) -> str:
        doc, _ = self._call("confirm", job, round_no, {"survivors": list(survivors)})
        signature = doc.get("signature")
        if not isinstance(signature, str):
            raise SiteError(f"site {self.name}: no signature in its confirmation")
        return signature

    def reveal(
        self,
        job: str,
        round_no: int,
        survivors: tuple[str, ...],
        confirmations: Mapping[str, str],
    ) -> Reveal:
        doc, _ = self._call(
            "reveal",
            job,
            round_no,
            {"survivors": list(survivors), "confirmations": dict(confirmations)},
        )
        return wire.reveal_value(doc.get("reveal"))

    def countersign(self, order: RunOrder, final: Path, report: Report, dest: Path) -> Countersign:
        doc, model = self._call(
            "countersign",
            order.job_id,
            -1,
            {"order": order_json(order)},
            final.read_bytes(),
            timeout_s=order.spec.resources.timeout_s + JOIN_MARGIN_S,
        )
        for r in wire.reports_value(doc.get("reports", []), site=self.name):
            report(r)
        signed = wire.countersign_value(doc.get("countersign"))
        dest.write_bytes(model)  # the model it signed; checked against every signature
        return signed

    def forget(self, job: str, round_no: int) -> None:
        self._lengths.pop((job, round_no), None)
        self._box.post(self.name, FORGET, job, round_no, wire.pack({}))
