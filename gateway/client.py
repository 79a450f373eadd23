"""The Python SDK: a typed client for the gateway over mTLS.

Every method returns domain values (the gateway's records, :class:`JobEvent`, the audit
package's values, :class:`ReviewReport`; :mod:`gateway._convert` turns each response into one),
never a protobuf message. Every method raises :mod:`policies.errors` classes (gRPC errors are
mapped back through the same table the server uses, a malformed response is an
:class:`IntegrityError`), so SDK users catch ``SealroomError`` and nothing from grpc.
Uploads stream in 1 MiB chunks with their SHA-256 in the header; downloads are written into a
fresh directory, refusing any path that would land outside it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

import grpc
from sealroom.v1 import gateway_pb2 as pb
from sealroom.v1 import gateway_pb2_grpc as pb_grpc

from enclave.audit import AuditRecord, DatasetReport, SignedCheckpoint
from enclave.identity import IdentityFiles
from enclave.signatures import sign
from enclave.writebehind import WriteBehind
from gateway import _convert as convert
from gateway._convert import AuditProof, JobView, SiteInfo, SiteKeyRotation
from gateway._status import error_for
from gateway._views import JobEvent
from gateway.store import DatasetRecord, PolicyRecord
from policies.approval import ApprovalBinding
from policies.document import parse_policy
from policies.errors import IntegrityError, InvalidInput, NotFound
from policies.identity import Principal
from policies.review import ReviewReport
from policies.signing import approval_message, policy_message

__all__ = ["AuditProof", "Client", "JobView", "SiteInfo", "SiteKeyRotation", "pack_directory"]

CHUNK = 1 << 20
T = TypeVar("T")
M = TypeVar("M")
V = TypeVar("V")


def _value(convert_fn: Callable[[M], V], msg: M) -> V:
    """``msg`` as its domain value; a response that makes no valid value is an
    :class:`IntegrityError` (the gateway, or something between, sent it wrong)."""
    try:
        return convert_fn(msg)
    except (ValueError, InvalidInput) as e:
        raise IntegrityError(f"the gateway sent a malformed {type(msg).__name__}: {e}") from e


def _sha256_file(path: Path) -> str:
    """The file's SHA-256, read in blocks (a bundle or a release can be gigabytes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pack_directory(src: Path, dest: Path, *, gzip: bool) -> Path:
    """Tar ``src`` (regular files and directories only) reproducibly into ``dest``."""
    if not src.is_dir():
        raise InvalidInput(f"{src} is not a directory")
    mode: Literal["w:gz", "w"] = "w:gz" if gzip else "w"
    with tarfile.open(dest, mode, format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(src.rglob("*")):
            if path.is_symlink():
                raise InvalidInput(f"{path} is a symbolic link; pack real files only")
            if not (path.is_file() or path.is_dir()):
                raise InvalidInput(f"{path} is not a regular file or directory")
            info = tar.gettarinfo(path, arcname=path.relative_to(src).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return dest


class Client:
    def __init__(self, address: str, identity: IdentityFiles, *, timeout_s: float = 60.0) -> None:
        cert, key, ca = identity.read()
        self._cert_pem, self._key_pem = cert, key  # decisions and policies are signed here
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        self._channel = grpc.secure_channel(
            address,
            creds,
            options=[
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ],
        )
        self._stub = pb_grpc.GatewayStub(self._channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        try:
            return fn(*args, timeout=kw.pop("timeout", self.timeout_s), **kw)
        except grpc.RpcError as e:
            raise error_for(e.code(), e.details() or str(e.code())) from e

    def _stream(
        self, fn: Callable[..., Iterator[T]], request: Any, timeout: float | None = None
    ) -> Iterator[T]:
        try:
            yield from fn(request, timeout=timeout)
        except grpc.RpcError as e:
            raise error_for(e.code(), e.details() or str(e.code())) from e

    @staticmethod
    def _chunks(path: Path | None, wrap: Callable[[bytes], Any]) -> Iterator[Any]:
        if path is None:
            return
        with path.open("rb") as f:
            while data := f.read(CHUNK):
                yield wrap(data)

    # -- identity and datasets ----------------------------------------------------------------

    def rotate_site_key(self) -> SiteKeyRotation:
        r = self._call(self._stub.RotateSiteKey, pb.RotateSiteKeyRequest())
        return _value(convert.rotation_value, r)

    def sites(self) -> list[SiteInfo]:
        """The remote sites the gateway has heard from (operators, compliance)."""
        r = self._call(self._stub.ListSites, pb.ListSitesRequest())
        return [_value(convert.site_value, m) for m in r.sites]

    def whoami(self) -> Principal:
        return _value(convert.principal_value, self._call(self._stub.WhoAmI, pb.WhoAmIRequest()))

    def register_dataset(self, name: str, source: Path, *, description: str = "") -> DatasetRecord:
        """Register a directory (packed as tar) or a tar archive as the next version."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = (
                source
                if source.is_file()
                else pack_directory(source, Path(tmp) / "dataset.tar", gzip=False)
            )
            header = pb.RegisterDatasetHeader(
                name=name, description=description, archive_sha256=_sha256_file(archive)
            )

            def messages() -> Iterator[pb.RegisterDatasetChunk]:
                yield pb.RegisterDatasetChunk(header=header)
                yield from self._chunks(archive, lambda d: pb.RegisterDatasetChunk(data=d))

            d = self._call(self._stub.RegisterDataset, messages(), timeout=None)
            return _value(convert.dataset_value, d)

    def datasets(self) -> list[DatasetRecord]:
        r = self._call(self._stub.ListDatasets, pb.ListDatasetsRequest())
        return [_value(convert.dataset_value, d) for d in r.datasets]

    def put_policy(self, dataset: str, document: str) -> PolicyRecord:
        """Store the next policy version of ``dataset``, signed here with this identity's key
        with its version number (:func:`policies.signing.policy_message`): a site accepts no
        policy its owner did not sign, and never an older version than one it has run under.
        Raises InvalidState when another version was written since this one was numbered."""
        try:
            version = self.policy(dataset).version + 1  # the latest one, not every text
        except NotFound:
            version = 1
        signature = sign(self._key_pem, policy_message(dataset, version, document))
        p = self._call(
            self._stub.PutPolicy,
            pb.PutPolicyRequest(
                dataset=dataset,
                document=document,
                signature=signature,
                signer_cert=self._cert_pem.decode(),
                version=version,
            ),
        )
        return _value(convert.policy_value, p)

    def policy(self, dataset: str, version: int = 0) -> PolicyRecord:
        p = self._call(self._stub.GetPolicy, pb.GetPolicyRequest(dataset=dataset, version=version))
        return _value(convert.policy_value, p)

    def policy_versions(self, dataset: str) -> list[PolicyRecord]:
        r = self._call(self._stub.ListPolicyVersions, pb.GetPolicyRequest(dataset=dataset))
        return [_value(convert.policy_value, p) for p in r.versions]

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, spec_text: str, *, bundle: Path | None = None) -> JobView:
        """Submit a spec, with a code bundle (a directory, packed as tar.gz, or an archive)."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = None
            if bundle is not None:
                archive = (
                    bundle
                    if bundle.is_file()
                    else pack_directory(bundle, Path(tmp) / "bundle.tar.gz", gzip=True)
                )
            # Hashed as it is sent (one read of the bundle), then held against the hash the
            # gateway recorded for the job: a bundle changed on the way is caught either way.
            sent = hashlib.sha256()
            header = pb.SubmitJobHeader(spec=spec_text)

            def messages() -> Iterator[pb.SubmitJobChunk]:
                yield pb.SubmitJobChunk(header=header)
                for d in self._chunks(archive, bytes):
                    sent.update(d)
                    yield pb.SubmitJobChunk(bundle=d)

            job = _value(
                convert.job_value, self._call(self._stub.SubmitJob, messages(), timeout=None)
            )
            if archive is not None and job.bundle_sha256 != sent.hexdigest():
                raise IntegrityError(
                    f"the gateway recorded bundle {job.bundle_sha256} for job "
                    f"{job.id}, but {sent.hexdigest()} was sent"
                )
            return job

    def job(self, job_id: str) -> JobView:
        j = self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))
        return _value(convert.job_value, j)

    def jobs(self, state: str = "") -> list[JobView]:
        r = self._call(self._stub.ListJobs, pb.ListJobsRequest(state=state))
        return [_value(convert.job_value, j) for j in r.jobs]

    def decide(self, job_id: str, *, approve: bool, reason: str = "") -> JobView:
        """Approve or deny a job, signed here with this identity's key over the job's binding
        as this client computes it (:meth:`binding`): what the owner signs is what they saw,
        and a site runs nothing an owner's signature does not cover."""
        decision = "approve" if approve else "deny"
        signature = sign(self._key_pem, approval_message(self.binding(job_id), decision))
        j = self._call(
            self._stub.DecideJob,
            pb.DecideJobRequest(
                job_id=job_id,
                approve=approve,
                reason=reason,
                signature=signature,
                signer_cert=self._cert_pem.decode(),
            ),
        )
        return _value(convert.job_value, j)

    def binding(self, job_id: str) -> str:
        """The digest of what approving ``job_id`` binds, computed here from the job as the
        gateway shows it and the policy texts it names (the spec's hash is checked against the
        spec shown). Raises IntegrityError when the job's spec is not the one its hash names."""
        job = self.job(job_id)
        if hashlib.sha256(job.spec.encode()).hexdigest() != job.spec_sha256:
            raise IntegrityError(f"job {job_id}: its spec is not the one its hash names")
        refs = [
            parse_policy(self.policy(name, version).document, version=version).ref()
            for name, version in sorted(job.policy_versions.items())
        ]
        return ApprovalBinding.create(
            job_id=job.id,
            spec_digest=job.spec_sha256,
            bundle_digest=job.bundle_sha256 or None,
            dataset_versions={d.name: d.version for d in job.datasets},
            policies=refs,
        ).digest()

    def review_release(self, job_id: str) -> ReviewReport:
        r = self._call(self._stub.ReviewRelease, pb.ReviewReleaseRequest(job_id=job_id))
        return _value(convert.review_value, r)

    def decide_release(self, job_id: str, *, approve: bool, reason: str = "") -> JobView:
        j = self._call(
            self._stub.DecideRelease,
            pb.DecideReleaseRequest(job_id=job_id, approve=approve, reason=reason),
        )
        return _value(convert.job_value, j)

    def cancel(self, job_id: str, reason: str = "") -> JobView:
        j = self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id, reason=reason))
        return _value(convert.job_value, j)

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's events until it ends (or ``timeout`` seconds pass)."""
        for e in self._stream(self._stub.WatchJob, pb.WatchJobRequest(job_id=job_id), timeout):
            yield _value(convert.event_value, e)

    def logs(self, job_id: str) -> bytes:
        buf = io.BytesIO()
        for chunk in self._stream(self._stub.GetJobLogs, pb.GetJobLogsRequest(job_id=job_id)):
            buf.write(chunk.data)
        return buf.getvalue()

    def download_release(self, job_id: str, dest: Path) -> Path:
        """Write the release into ``dest`` (created; must not exist or be empty)."""
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise InvalidInput(f"{dest} is not empty")
        current: tuple[Path, str, Any, Any] | None = None

        def finish() -> None:
            if current is None:
                return
            path, expected, f, h = current
            f.close()
            if h.hexdigest() != expected:
                raise IntegrityError(f"{path.name}: sha256 {h.hexdigest()} != sent {expected}")

        for chunk in self._stream(
            self._stub.DownloadRelease, pb.DownloadReleaseRequest(job_id=job_id)
        ):
            if chunk.WhichOneof("part") == "file":
                finish()
                rel = PurePosixPath(chunk.file.path)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise IntegrityError(f"release sent an unsafe path {chunk.file.path!r}")
                path = dest.joinpath(*rel.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                out = WriteBehind.create(path, mode=0o644)
                current = (path, chunk.file.sha256, out, hashlib.sha256())
            else:
                if current is None:
                    raise IntegrityError("release sent data before a file header")
                current[2].write(chunk.data)
                current[3].update(chunk.data)
        finish()
        return dest

    # -- audit ------------------------------------------------------------------------------

    def audit_query(self, **filters: Any) -> list[AuditRecord]:
        r = self._call(self._stub.QueryAudit, pb.QueryAuditRequest(**filters))
        return [_value(convert.audit_record_value, rec) for rec in r.records]

    def audit_export(self, dest: Path, *, site: str = "") -> Path:
        """The log as JSON lines at ``dest``: the gateway's, or its copy of ``site``'s (which
        verifies under that site's key: :meth:`site_checkpoint`)."""
        with dest.open("wb") as f:
            for chunk in self._stream(self._stub.ExportAudit, pb.ExportAuditRequest(site=site)):
                f.write(chunk.data)
        return dest

    def audit_checkpoint(self, *, fresh: bool = False, site: str = "") -> SignedCheckpoint:
        """The latest signed checkpoint (a new one with ``fresh``), its signature not yet
        checked: call :meth:`SignedCheckpoint.verify` with the gateway's public key (for a
        ``site``'s log, the key of :meth:`site_checkpoint`)."""
        cp = self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest(fresh=fresh, site=site))
        return _value(convert.checkpoint_value, cp)

    def site_checkpoint(self, site: str) -> tuple[SignedCheckpoint, str]:
        """The latest checkpoint of ``site``'s log the gateway holds (its signature not yet
        checked) and the PEM certificate of the key that signed it: check that against the
        deployment CA before trusting it (:func:`enclave.provenance.verify.site_identity`)."""
        cp = self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest(site=site))
        return _value(convert.checkpoint_value, cp), cp.signer_cert

    def audit_inclusion_proof(self, seq: int, tree_size: int = 0, *, site: str = "") -> AuditProof:
        p = self._call(
            self._stub.GetInclusionProof,
            pb.InclusionProofRequest(seq=seq, tree_size=tree_size, site=site),
        )
        return _value(convert.proof_value, p)

    def audit_consistency_proof(
        self, old_size: int, new_size: int = 0, *, site: str = ""
    ) -> AuditProof:
        p = self._call(
            self._stub.GetConsistencyProof,
            pb.ConsistencyProofRequest(old_size=old_size, new_size=new_size, site=site),
        )
        return _value(convert.proof_value, p)

    def audit_report(self, dataset: str) -> DatasetReport:
        r = self._call(self._stub.AuditReport, pb.AuditReportRequest(dataset=dataset))
        return _value(convert.report_value, r)
