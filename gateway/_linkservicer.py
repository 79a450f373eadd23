"""The SiteLink gRPC servicer: each call of a remote site, one call into :class:`SiteLinks` (or
the catalogue, for a pushed dataset). The site is the name in its certificate (role ``site``,
checked with every call by :mod:`gateway._auth`); nothing in a request can name another.

A pushed release is written under the lease's incoming directory and verified there as the
model team will verify it (:func:`enclave.provenance.verify.verify_release`: the signature
chains to the deployment CA, the signer is the pushing site, every file matches the manifest,
none is missing or extra). Only then may the report that names it come; a push that fails
leaves nothing behind and says why.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import grpc
from sealroom.v1 import site_pb2 as pb
from sealroom.v1 import site_pb2_grpc as pb_grpc

from enclave.audit import SignedCheckpoint
from enclave.contract import StoredDataset
from enclave.provenance.verify import verify_release
from enclave.writebehind import WriteBehind
from gateway._auth import principal_of
from gateway._roundlink import RoundMailbox
from gateway._siteaudit import SiteAudits
from gateway._sitelink import SiteLinks
from policies.errors import (
    IntegrityError,
    InvalidInput,
    InvalidState,
    ResourceExhausted,
    SealroomError,
)

CHUNK = 1 << 20
MAX_ROUND_WAIT_S = 30.0
MAX_RELEASE_FILES = 10_000

PushDataset = Callable[[str, str, StoredDataset, str], None]
"""(site, owner, the stored version's metadata, description): record a dataset a site keeps."""


class SiteLinkServicer(pb_grpc.SiteLinkServicer):
    def __init__(
        self,
        links: SiteLinks,
        *,
        ca_cert_pem: bytes,
        max_release_bytes: int,
        push_dataset: PushDataset,
        site_audits: SiteAudits | None = None,
        rounds: RoundMailbox | None = None,
    ) -> None:
        self.site_audits = site_audits
        self.rounds = rounds
        self.links = links
        self.ca_cert_pem = ca_cert_pem
        self.max_release_bytes = max_release_bytes
        self.push_dataset = push_dataset

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        leases = self.links.hello(
            _site(context),
            version=request.version,
            image_id=request.image_id,
            slots=request.slots,
            held=[h.job_id for h in request.held],
        )
        return pb.HelloResponse(
            leases=leases,
            heartbeat_s=self.links.heartbeat_s,
            lease_s=self.links.lease_s,
            audit_size=self.site_audits.size(_site(context)) if self.site_audits else 0,
        )

    def PullWork(
        self, request: pb.PullWorkRequest, context: grpc.ServicerContext
    ) -> pb.PullWorkResponse:
        got = self.links.pull(_site(context), wait_s=request.wait_s)
        if got is None:
            return pb.PullWorkResponse()
        job_id, order, has_bundle = got
        return pb.PullWorkResponse(
            lease=pb.Lease(job_id=job_id, order_json=order, has_bundle=has_bundle)
        )

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(cancel=self.links.heartbeat(_site(context)))

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        return pb.ReportResponse(
            next_seq=self.links.report(_site(context), request.seq, request.report)
        )

    def FetchBundle(
        self, request: pb.FetchBundleRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BundleChunk]:
        path = self.links.bundle(_site(context), request.job_id)
        if path is None:
            return
        with path.open("rb") as f:
            while data := f.read(CHUNK):
                yield pb.BundleChunk(data=data)

    def PushRelease(
        self, request_iterator: Iterator[pb.SiteReleaseChunk], context: grpc.ServicerContext
    ) -> pb.PushReleaseResponse:
        site = _site(context)
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "job_id":
            raise InvalidInput("the first message of a pushed release must name its job")
        job_id = first.job_id
        root = self.links.release_root(site, job_id)
        try:
            digests = self._receive(it, root / "release")
            # Each file was hashed as it arrived, beside its write: not read back.
            verified = verify_release(
                root / "release", ca_cert_pem=self.ca_cert_pem, digests=digests
            )
            if verified.site != site:
                raise IntegrityError(
                    f"the release is signed by site {verified.site!r}, not by {site!r}"
                )
            self.links.accept_release(site, job_id, root / "release")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return pb.PushReleaseResponse(
            files=len(digests), bytes=sum(size for _, size in digests.values())
        )

    def _receive(self, it: Iterator[pb.SiteReleaseChunk], dest: Path) -> dict[str, tuple[str, int]]:
        """Write each file of a pushed release under ``dest``, hashing it as it arrives; each
        file's (sha256, size) by its relative path."""
        dest.mkdir(mode=0o700)
        digests: dict[str, tuple[str, int]] = {}
        current: _Incoming | None = None
        total = 0
        try:
            for msg in it:
                part = msg.WhichOneof("part")
                if part == "file":
                    if current is not None:
                        digests[current.rel] = current.finish()
                        current = None
                    if len(digests) + 1 > MAX_RELEASE_FILES:
                        raise ResourceExhausted(f"a release has at most {MAX_RELEASE_FILES} files")
                    path = dest / _safe(msg.file.path)
                    rel = path.relative_to(dest).as_posix()
                    if rel in digests:
                        raise InvalidInput(f"a pushed release sends {rel} twice")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    current = _Incoming(rel, path, msg.file.size)
                elif part == "data":
                    if current is None:
                        raise InvalidInput("release bytes beyond the size their file announced")
                    total += len(msg.data)
                    if total > self.max_release_bytes:
                        raise ResourceExhausted(
                            f"a release is at most {self.max_release_bytes} bytes"
                        )
                    current.write(msg.data)
                else:
                    raise InvalidInput(f"unexpected {part or 'empty'} message in a pushed release")
            if current is not None:
                digests[current.rel] = current.finish()
                current = None
        finally:
            if current is not None:
                current.out.close()
        return digests

    def PullRound(
        self, request: pb.PullRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundChunk]:
        if self.rounds is None:
            return
        step = self.rounds.pull(_site(context), wait_s=min(request.wait_s, MAX_ROUND_WAIT_S))
        if step is None:
            return
        yield pb.RoundChunk(
            header=pb.RoundStepHeader(
                step_id=step.step_id, kind=step.kind, job_id=step.job_id, round=step.round
            )
        )
        for at in range(0, len(step.payload), CHUNK):
            yield pb.RoundChunk(data=step.payload[at : at + CHUNK])

    def AnswerRound(
        self, request_iterator: Iterator[pb.RoundChunk], context: grpc.ServicerContext
    ) -> pb.AnswerRoundResponse:
        if self.rounds is None:
            raise InvalidState("this gateway runs no federated rounds")
        header: pb.RoundStepHeader | None = None
        parts: list[bytes] = []
        size = 0
        for chunk in request_iterator:
            if chunk.HasField("header"):
                if header is not None:
                    raise InvalidInput("a round answer has one header")
                header = chunk.header
                continue
            if header is None:
                raise InvalidInput("a round answer starts with its header")
            size += len(chunk.data)
            if size > self.max_release_bytes:
                raise ResourceExhausted("a round answer is larger than a release may be")
            parts.append(chunk.data)
        if header is None:
            raise InvalidInput("a round answer has no header")
        self.rounds.answer(
            _site(context),
            header.step_id,
            error=header.error,
            error_kind=header.error_kind,
            payload=b"".join(parts),
        )
        return pb.AnswerRoundResponse()

    def PushDataset(
        self, request: pb.PushDatasetRequest, context: grpc.ServicerContext
    ) -> pb.PushDatasetResponse:
        stored = StoredDataset(
            name=request.name,
            version=request.version,
            root_hash=request.root_hash,
            size=request.size,
            files=tuple((f.path, f.size, f.sha256) for f in request.files),
        )
        self.push_dataset(_site(context), request.owner, stored, request.description)
        return pb.PushDatasetResponse()

    def PushAudit(
        self, request_iterator: Iterator[pb.SiteAuditChunk], context: grpc.ServicerContext
    ) -> pb.PushAuditResponse:
        if self.site_audits is None:
            raise InvalidInput("this gateway keeps no record of site audit logs")
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidInput("a pushed audit log starts with its checkpoint")
        h = first.header
        cp = SignedCheckpoint(h.size, h.root, h.time, h.signature)

        def leaves() -> Iterator[bytes]:
            for chunk in request_iterator:
                if chunk.WhichOneof("part") != "records":
                    raise InvalidInput("a pushed audit log has one checkpoint, first")
                yield from chunk.records.leaves

        size = self.site_audits.push(
            _site(context), cp, signer_cert=h.signer_cert, from_size=h.from_size, leaves=leaves()
        )
        return pb.PushAuditResponse(size=size)


class _Incoming:
    """One file of a pushed release as it arrives: written behind, hashed, counted down to the
    size its header announced."""

    def __init__(self, rel: str, path: Path, size: int) -> None:
        self.rel, self.size, self.left = rel, size, size
        self.digest = hashlib.sha256()
        self.out = WriteBehind.create(path)

    def write(self, data: bytes) -> None:
        if len(data) > self.left:
            raise InvalidInput("release bytes beyond the size their file announced")
        self.digest.update(data)
        self.out.write(data)
        self.left -= len(data)

    def finish(self) -> tuple[str, int]:
        """(sha256, size) of the whole file. Raises InvalidInput if it ended early."""
        if self.left:
            raise InvalidInput(f"a file of the release ended early: {self.rel}")
        self.out.close()
        return self.digest.hexdigest(), self.size


def _site(context: grpc.ServicerContext) -> str:
    return principal_of(context).name


def _safe(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts):
        raise InvalidInput(f"unsafe path in a pushed release: {path!r}")
    if "\\" in path or "\x00" in path:
        raise InvalidInput(f"unsafe path in a pushed release: {path!r}")
    return p


__all__ = ["SealroomError", "SiteLinkServicer"]
