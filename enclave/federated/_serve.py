"""A remote site's side of federated rounds over the site link: it long-polls the gateway for
the steps addressed to it (``PullRound``), takes each on its own thread through the site's
:class:`enclave.federated.RoundSite` (its :class:`Participant`), and answers (``AnswerRound``).
What a step's training reports is recorded in the site's own audit log before it is sent, as a
run's reports are. A step the site refuses is answered with the error, named; the gateway
leaves the site out of that round. A lost link is reconnected with backoff, as the run loop's.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave.contract import RoundOrder, RunOrder, SiteReport
from enclave.federated import _wire as wire
from enclave.federated._participant import RoundSite
from enclave.linkwire import order_from_json
from policies.errors import IntegrityError, InvalidInput, SealroomError

log = logging.getLogger(__name__)
PULL_WAIT_S = 20.0
_STEP_ID = re.compile(r"[0-9a-f]{32}")
CHUNK = 1 << 20
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
Record = Callable[[str, SiteReport], None]


class RoundServer:
    """Serve ``rounds`` over ``stub`` until ``stop`` is set."""

    def __init__(
        self,
        stub: pb_grpc.SiteLinkStub,
        rounds: RoundSite,
        *,
        state: Path,
        record: Record,
        stop: threading.Event,
    ) -> None:
        self._stub, self._rounds, self._record, self._stop = stub, rounds, record, stop
        self._starts = state / "round-starts"
        self._starts.mkdir(parents=True, exist_ok=True, mode=0o700)

    def serve(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                got = self._pull()
                backoff = 0.2
            except grpc.RpcError as e:
                # Whatever the gateway answered (down, restarting, or refusing: a gateway that
                # runs no rounds), this site keeps serving its runs and asks again later.
                if e.code() not in _RETRY and e.code() is not grpc.StatusCode.CANCELLED:
                    log.warning("round steps refused by the gateway: %s", e.details())
                    backoff = 10.0
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 10.0)
                continue
            if got is not None:
                threading.Thread(target=self._take, args=got, daemon=True).start()

    def _pull(self) -> tuple[pb.RoundStepHeader, bytes] | None:
        call = self._stub.PullRound(
            pb.PullRoundRequest(wait_s=PULL_WAIT_S), timeout=PULL_WAIT_S + 10
        )
        header: pb.RoundStepHeader | None = None
        parts: list[bytes] = []
        for chunk in call:
            if self._stop.is_set():
                call.cancel()
                return None
            if chunk.HasField("header"):
                header = chunk.header
            else:
                parts.append(chunk.data)
        return None if header is None else (header, b"".join(parts))

    def _take(self, header: pb.RoundStepHeader, payload: bytes) -> None:
        error, kind, answer = "", "", b""
        try:
            if not _STEP_ID.fullmatch(header.step_id):  # it names a file here: never a path
                raise InvalidInput("round step: a malformed step id")
            doc, blob = wire.unpack(payload)
            answer = self._do(header, doc, blob)
        except SealroomError as e:
            error, kind = str(e), type(e).__name__
        except Exception as e:  # answered all the same: the gateway must not wait it out
            log.exception("round step %s failed", header.kind)
            error, kind = f"the site failed ({type(e).__name__})", "SiteError"
        if header.kind == "forget":
            return
        reply = pb.RoundStepHeader(step_id=header.step_id, error=error, error_kind=kind)

        def chunks() -> Iterator[pb.RoundChunk]:
            yield pb.RoundChunk(header=reply)
            for at in range(0, len(answer), CHUNK):
                yield pb.RoundChunk(data=answer[at : at + CHUNK])

        for attempt in range(5):
            try:
                self._stub.AnswerRound(chunks(), timeout=60)
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRY or self._stop.wait(0.5 * 2**attempt):
                    return

    def _do(self, h: pb.RoundStepHeader, doc: dict[str, Any], blob: bytes) -> bytes:
        job, r = h.job_id, int(h.round)
        if h.kind == "layout":
            layout, config = self._rounds.round_layout(_order(doc))
            return wire.pack({"layout": wire.layout_doc(layout), "config": wire.b64(config)})
        if h.kind == "join":
            return self._join(h.step_id, job, r, doc, blob)
        if h.kind == "share":
            adverts = doc.get("adverts")
            if not isinstance(adverts, dict):
                raise InvalidInput("round payload: no adverts")
            sealed = self._rounds.share(
                job, r, {k: wire.advert_value(v) for k, v in adverts.items()}
            )
            return wire.pack({"sealed": wire.boxes_doc(sealed)})
        if h.kind == "mask":
            inbox = wire.boxes_value(doc.get("inbox"), "inbox")  # decoded before anything runs
            words = self._rounds.mask(job, r, inbox)
            return wire.pack({}, words.astype("<u8").tobytes())
        if h.kind == "confirm":
            survivors = wire.survivors_value(doc.get("survivors"))
            return wire.pack({"signature": self._rounds.confirm(job, r, survivors)})
        if h.kind == "reveal":
            confirmations = doc.get("confirmations")
            if not isinstance(confirmations, dict):
                raise InvalidInput("round payload: no confirmations")
            out = self._rounds.reveal(
                job,
                r,
                wire.survivors_value(doc.get("survivors")),
                {str(k): str(v) for k, v in confirmations.items()},
            )
            return wire.pack({"reveal": wire.reveal_doc(out)})
        if h.kind == "forget":
            self._rounds.forget(job, r)
            return b""
        if h.kind == "countersign":
            return self._countersign(h.step_id, job, doc, blob)
        raise InvalidInput(f"round step {h.kind!r} is unknown")

    def _join(self, step: str, job: str, r: int, doc: dict[str, Any], blob: bytes) -> bytes:
        order = _order(doc)
        if order.job_id != job:
            raise InvalidInput("round payload: the order is another job's")
        digest = doc.get("start_sha256")
        if hashlib.sha256(blob).hexdigest() != digest:
            raise IntegrityError("the round's start does not match its digest")
        start = self._starts / f"{step}.safetensors"  # a file of this step's own
        start.write_bytes(blob)
        reports: list[SiteReport] = []

        def report(rep: SiteReport) -> None:
            self._record(rep.job_id, rep)  # in the site's own log first
            reports.append(rep)

        try:
            advert = self._rounds.join(
                RoundOrder(order, r, start, str(digest)),
                wire.config_value(doc.get("config")),
                report,
            )
        finally:
            start.unlink(missing_ok=True)
        return wire.pack(
            {
                "advert": None if advert is None else wire.advert_doc(advert),
                "reports": wire.reports_doc(reports),
            }
        )

    def _countersign(self, step: str, job: str, doc: dict[str, Any], blob: bytes) -> bytes:
        order = _order(doc)
        if order.job_id != job:
            raise InvalidInput("round payload: the order is another job's")
        final = self._starts / f"{step}.safetensors"
        final.write_bytes(blob)
        reports: list[SiteReport] = []

        def report(rep: SiteReport) -> None:
            self._record(rep.job_id, rep)
            reports.append(rep)

        released = self._starts / f"{step}.release.safetensors"
        try:
            signed = self._rounds.countersign(order, final, report, released)
            model = released.read_bytes()
        finally:
            final.unlink(missing_ok=True)
            released.unlink(missing_ok=True)
        return wire.pack(
            {"countersign": wire.countersign_doc(signed), "reports": wire.reports_doc(reports)},
            model,
        )


def _order(doc: dict[str, Any]) -> RunOrder:
    text = doc.get("order")
    if not isinstance(text, str):
        raise InvalidInput("round payload: no order")
    return order_from_json(text, bundle=None)
