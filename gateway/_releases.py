"""The gateway's release store and the owners' review of held releases. A site's signed release
is copied in under ``releases/<job id>/`` (whole, then renamed into place) when it reports the
job RELEASED; its id is the SHA-256 of its manifest. Where a dataset's policy asks for review of
custom code, the passed release is held (AWAITING_REVIEW) and its owners decide it on a report
read from the site-signed release: the weights channel's capacity and the gate's checks. The
audit log is the record of their verdicts. State changes are left to the façade.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave.audit import AuditLog
from enclave.provenance import MANIFEST, Manifest
from gateway._evaluate import Evaluator
from gateway._facade import Facade
from gateway.store import JobRecord, Store
from policies import access, review
from policies.channels import TeamReason
from policies.errors import (
    IntegrityError,
    InvalidState,
    NotFound,
    PermissionDenied,
    SealroomError,
)
from policies.identity import Principal, Role
from policies.lifecycle import JobState
from policies.spec import parse_spec


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release as it is sent: its path in the release, where it lies, its size
    and its SHA-256."""

    rel: str
    path: Path
    size: int
    sha256: str


def release_files(root: Path) -> list[ReleaseFile]:
    """Every file of the release under ``root``, in path order. The artifacts' sizes and hashes
    are the signed manifest's: the client checks the bytes it gets against the value the site
    signed, so a copy damaged on the gateway's disk is caught, and a gigabyte release is not
    read twice to be sent once. The other files (the manifest, its signature, the site's
    certificate: small) are hashed here, as is every file when the manifest does not parse
    (the team's verification then refuses the release; the download still shows what it is)."""
    raw = (root / MANIFEST).read_bytes()
    try:
        listed = {a.path: a for a in Manifest.from_bytes(raw).artifacts}
    except SealroomError:
        listed = {}
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if (a := listed.get(rel)) is not None:
            files.append(ReleaseFile(rel, path, a.size, a.sha256))
        else:
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            files.append(ReleaseFile(rel, path, path.stat().st_size, digest))
    return files


class ReleaseStore:
    """Releases under ``root``, one directory per job."""

    def __init__(
        self,
        facade: Facade,
        root: Path,
        *,
        store: Store,
        audit: AuditLog,
        evaluator: Evaluator,
    ) -> None:
        self._g = facade
        self.root = root
        self.store = store
        self.audit = audit
        self.evaluator = evaluator
        root.mkdir(parents=True, exist_ok=True)

    # -- the store ---------------------------------------------------------------------------

    def accept(self, job_id: str, release_dir: Path) -> str:
        """Copy the site's release of ``job_id`` in (replacing any earlier copy); returns the
        release id, the SHA-256 of its manifest."""
        dest = self.root / job_id
        tmp = self.root / f".{job_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(release_dir, tmp, symlinks=True)
        tmp.replace(dest)
        manifest = (dest / "manifest.json").read_bytes()
        return hashlib.sha256(manifest).hexdigest()

    def released(self, job: JobRecord) -> Path:
        """The directory of a RELEASED job's release. Raises InvalidState for a job in any
        other state, NotFound when the directory is missing."""
        if job.state is not JobState.RELEASED:
            raise InvalidState(f"job {job.id} is {job.state}: nothing has been released")
        path = self.root / job.id
        if not path.is_dir():
            raise NotFound(f"the release of job {job.id} is missing from the release store")
        return path

    def discard(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def metrics(self, job_id: str) -> dict[str, float]:
        metrics = json.loads((self.root / job_id / "metrics.json").read_text())
        return {k: float(v) for k, v in metrics.items()}

    # -- review ------------------------------------------------------------------------------

    def review_report(self, principal: Principal, job_id: str) -> review.ReviewReport:
        """The report an owner decides a held release on (see the façade); audited."""
        job, reviewers = self.reviewable(principal, job_id)
        report = self._report(job, reviewers)
        self._g.record(
            principal,
            "release.review",
            job_id=job_id,
            details={
                "release_id": report.release_id,
                "weights_capacity_bits": report.capacity.bits,
            },
        )
        return report

    def decide(self, principal: Principal, job_id: str, *, approve: bool, reason: str) -> JobRecord:
        """An owner's verdict on a held release (see the façade); audited."""
        job, reviewers = self.reviewable(principal, job_id)
        report = self._report(job, reviewers)
        self._g.record(
            principal,
            "release.approve" if approve else "release.reject",
            job_id=job_id,
            details={
                "release_id": report.release_id,
                "weights_capacity_bits": report.capacity.bits,
                "datasets": sorted(d for d, o in reviewers.items() if o == principal.name),
                "reason": reason,
            },
        )
        if not approve:
            self.discard(job_id)
            # The owner's words stay in the audit log: the team sees the verdict only.
            return self._g._transition(
                job_id, JobState.REJECTED, reason=TeamReason.REJECTED_BY_REVIEW
            )
        if set(reviewers.values()) <= self.approvers(job_id, report.release_id):
            return self._g._transition(
                job_id,
                JobState.RELEASED,
                reason=TeamReason.RELEASED_AFTER_REVIEW,
                release_id=report.release_id,
                metrics=self.metrics(job_id),
            )
        return self.store.job(job_id)

    def held_for_review(
        self, job_id: str, state: JobState, reason: str, changes: dict[str, Any]
    ) -> tuple[JobState, str]:
        """A passed release of reviewed custom code waits for its owners (AWAITING_REVIEW):
        staged in the release store, but neither its id nor its metrics reach the job record,
        so the team sees the state only until the owners approve. Edits ``changes``."""
        if state is not JobState.RELEASED or not self.reviewers(self.store.job(job_id)):
            return state, reason
        changes.pop("release_id", None)
        changes.pop("metrics", None)
        return JobState.AWAITING_REVIEW, TeamReason.AWAITING_REVIEW

    def reviewers(self, job: JobRecord) -> dict[str, str]:
        """Dataset -> owner, for each dataset whose policy (the version the job ran under)
        makes the job's release wait for review."""
        spec = parse_spec(job.spec)
        return {
            name: self.evaluator.owner(name)
            for name, doc in self.evaluator.policies_at(job.policy_versions).items()
            if access.needs_review(spec, doc)
        }

    def reviewable(self, principal: Principal, job_id: str) -> tuple[JobRecord, dict[str, str]]:
        """The held job ``principal`` reviews, and its reviewers. Raises NotFound (the same
        answer as for someone else's job), PermissionDenied for an owner with nothing to
        review in it, InvalidState for a job not waiting for review."""
        job = self.store.job(job_id)
        if principal.role is not Role.DATA_OWNER or not self.evaluator.may_see(principal, job):
            raise NotFound(f"no job {job_id}")  # the same answer as for someone else's job
        reviewers = self.reviewers(job)
        if principal.name not in reviewers.values():
            raise PermissionDenied(
                f"{principal.name} owns no dataset of job {job_id} whose policy asks for review"
            )
        if job.state is not JobState.AWAITING_REVIEW:
            raise InvalidState(f"job {job_id} is {job.state}, not waiting for review")
        return job, reviewers

    def _report(self, job: JobRecord, reviewers: Mapping[str, str]) -> review.ReviewReport:
        dest = self.root / job.id
        raw = (dest / MANIFEST).read_bytes()
        manifest = Manifest.from_bytes(raw)
        release_id = hashlib.sha256(raw).hexdigest()
        tensors = [
            t
            for a in manifest.artifacts
            if a.path.endswith(".safetensors")
            for t in _safetensors_header(dest / a.path)
        ]
        docs = self.evaluator.policies_at(job.policy_versions)
        return review.review_report(
            job_id=job.id,
            release_id=release_id,
            tensors=tensors,
            scrub_bits=[docs[d].release.scrub_bits for d in reviewers],
            checks=[
                review.CheckResult(g.dataset, c.name, c.passed, dict(c.figures))
                for g in manifest.gates
                for c in g.checks
            ],
            reviewers=reviewers.values(),
            approved_by=self.approvers(job.id, release_id),
        )

    def approvers(self, job_id: str, release_id: str) -> set[str]:
        """Owners who approved this release: the audit log is the record of their verdicts."""
        return {
            r.event.principal
            for r in self.audit.query(job=job_id, action="release.approve")
            if r.event.details.get("release_id") == release_id
        }


def _safetensors_header(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each tensor of a site-signed safetensors file, from its header (read
    by the safetensors library, which checks it). Raises IntegrityError for a file that is not
    one: a site's signature vouches for where a file came from, not for its form."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118 (not a mapping)
            return [(str(s.get_dtype()), tuple(int(d) for d in s.get_shape())) for s in slices]
    except (SafetensorError, OSError) as e:
        raise IntegrityError(f"{path.name}: not a safetensors file ({e})") from e
