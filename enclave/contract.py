"""What the gateway needs from an enclave site: the contract every site implements.

A site keeps the data: it stores dataset versions in its vault, runs approved jobs next to the
data, runs the release gate there, and signs what may leave. The gateway only ever sees dataset
metadata, run states, numeric progress, and signed releases.

Three implementations keep it: :class:`enclave.agent.SiteAgent` (the default deployment runs
one in the gateway's process), :class:`enclave.fake.FakeSite` (in-process, no vault and no
container, for fast tests), and a remote site serving ``sealroom.v1.SiteAgent``
(``proto/sealroom/v1/site.proto``, the wire form of :class:`Site`). ``tests/unit/
test_site_contract.py`` runs the same tests against each. The contract is :class:`Site`'s
docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from policies.lifecycle import JobState
from policies.spec import JobSpec


@dataclass(frozen=True)
class StoredDataset:
    name: str
    version: int
    root_hash: str
    size: int
    files: tuple[tuple[str, int, str], ...]  # (path, size, sha256)


@dataclass(frozen=True)
class RunOrder:
    """Everything a site needs to run one approved job."""

    job_id: str
    spec: JobSpec
    spec_sha256: str
    bundle: Path | None
    bundle_sha256: str
    datasets: tuple[tuple[str, int], ...]  # (name, version)
    policy_versions: Mapping[str, int]
    policy_documents: Mapping[str, str]  # dataset -> policy YAML in force
    approval_binding: str
    approvals: tuple[str, ...]  # approving owners
    audit_root: str
    """The audit log's Merkle root (hex) at dispatch: what the release is bound to."""
    epsilon_spent: Mapping[str, float] = field(default_factory=dict)
    """Per dataset, the privacy budget earlier releases used (for the DP check)."""
    dataset_owners: Mapping[str, str] = field(default_factory=dict)
    """Per dataset, its owner as the gateway records it (a site that keeps its own record of
    owners trusts that instead)."""
    approval_signatures: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Per approving owner: (PEM certificate, base64 signature) over
    :func:`policies.signing.approval_message` of ``approval_binding``, made in their client."""
    policy_signatures: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Per dataset: (PEM certificate, base64 signature) of its owner over
    :func:`policies.signing.policy_message` of the policy text in ``policy_documents`` as its
    version in ``policy_versions``."""


@dataclass(frozen=True)
class RoundOrder:
    """One round of a federated job at one site: the approved job (``order``, whole: its
    binding covers every dataset at every site, and the site checks every owner's signature),
    the round's number, and its start (the global model's trainable tensors, checked against
    ``start_sha256``). The site trains on the datasets of the order it holds."""

    order: RunOrder
    round: int
    start: Path
    start_sha256: str


@dataclass(frozen=True)
class RoundUpdate:
    """What a round leaves at its site once the gate passed: the gated update (trained minus
    start, flat, then the round's training loss; :func:`enclave.federated.round_vector`) and
    its FedAvg weight. It stays at the site; only its masked sum ever leaves."""

    vector: Any  # numpy float64 vector
    weight: int


@dataclass(frozen=True)
class SiteReport:
    """One thing a site tells the gateway about a run."""

    job_id: str
    state: JobState | None = None
    reason: str = ""
    """For the model team: a :class:`policies.channels.TeamReason`, never the job's words."""
    detail: str = ""
    """For the owners only: what happened (which check refused, the exit code)."""
    progress: tuple[int, int, float] | None = None  # (step, total, loss): a scheduled point
    owner_progress: tuple[int, int, float] | None = None
    """Full progress, for the owners and operators only."""
    channel_bits: float | None = None
    """With RUNNING: the capacity of what the team can observe of this run, now charged."""
    audit_action: str = ""  # e.g. "container.start"; empty for no audit event
    audit_outcome: str = "ok"
    audit_dataset: str = ""
    audit_file: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    image_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    release_dir: Path | None = None
    site: str = ""
    """The reporting site's name, where a gateway serves several (empty: the only one)."""


Report = Callable[[SiteReport], None]


class Site(Protocol):
    """One enclave site, as the gateway sees it.

    Runs. ``run(order, report)`` blocks until the run has ended, however it ends, and has then
    cleaned up after itself (no container, no staged data). Each report carries the order's
    ``job_id``. State reports come in lifecycle order: ``RUNNING``, ``CHECKING``, then exactly
    one terminal state, always the last state reported: ``RELEASED`` or ``AWAITING_REVIEW`` (the
    gate passed; ``release_dir`` holds the signed release), ``REJECTED`` (a release check
    refused), ``FAILED`` (the job's fault), ``CANCELLED`` (``cancel``), or ``ERROR`` (the
    site's fault: a dataset version it does not hold, a policy missing from the order, a job
    id it has run before). A run can end before it starts: then the terminal state is the only
    state reported. Between states come numeric progress, the capacity charged with
    ``RUNNING``, and audit events; never the job's words (its logs stay in the site, ``logs``).
    A job id runs at most once: a second ``run`` of it ends ``ERROR`` and starts nothing.
    ``run`` reports what a run meets, the site's own faults included, as states; it does not
    raise for them. An exception out of ``run`` (from ``report`` itself, or a
    :class:`policies.errors.SiteError` where the site cannot report at all) is the caller's to
    record as the run's ERROR.

    Idempotency. ``cancel`` may be called any number of times, for any job id, before, during
    or after its run; a run in progress then ends ``CANCELLED``, one that has ended keeps its
    end. ``store_dataset`` of an archive identical to the latest version returns that version.
    ``rotate_key`` called again after a crash finishes the rotation. ``close`` may be called
    any number of times. ``image_id`` and ``logs`` only read.
    """

    name: str

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        """Store a tar archive, read once from the stream ``archive``, as the next version of
        ``name`` (or the identical existing one). Raises InvalidInput; stores nothing then."""

    def run(self, order: RunOrder, report: Report) -> None:
        """Run an approved job to its end, reporting through ``report`` (see the class)."""

    def cancel(self, job_id: str) -> None:
        """Stop a run (idempotent)."""

    def logs(self, job_id: str) -> bytes:
        """The run's stdout and stderr, size-capped (empty for a job id the site never ran).
        They stay in the site's trust zone."""

    def image_id(self) -> str:
        """The runtime image the site runs jobs in (pinned by ID)."""

    def rotate_key(self) -> tuple[str, int]:
        """Re-wrap every data key under a new site key; returns (new key id, data keys
        re-wrapped). Crash-safe: called again after a crash it finishes the rotation."""

    def close(self) -> None:
        """Let go of what the site holds while idle (warm containers): the gateway calls it
        when it stops. Runs in progress are not touched. Idempotent."""
