"""The site's encrypted dataset vault and per-job staging.

Datasets are encrypted at rest (AES-256-GCM in authenticated chunks, a random data key per
version wrapped under the site key), registered as immutable versions with a root hash, and
decrypted only into a job's own memory-backed staging directory, which is destroyed when the job
ends. See :mod:`enclave.vault._chunks` (the file format), :mod:`enclave.vault._keys` (key
wrapping and rotation), :mod:`enclave.vault._model` (the root hash) and
:mod:`enclave.vault._staging` (staging and its events).
"""

from enclave.vault._bench import StageThroughput, measure_stage_throughput
from enclave.vault._chunks import DEFAULT_CHUNK_SIZE
from enclave.vault._ingest import Readable, iter_directory, iter_tar
from enclave.vault._model import DatasetVersion, FileEntry, check_relpath, parse_ref, root_hash
from enclave.vault._staging import (
    JOB_GID,
    Staging,
    StagingEvent,
    StagingEventKind,
    StagingState,
    wipe_leftovers,
)
from enclave.vault._vault import Vault

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "JOB_GID",
    "DatasetVersion",
    "FileEntry",
    "Readable",
    "StageThroughput",
    "Staging",
    "StagingEvent",
    "StagingEventKind",
    "StagingState",
    "Vault",
    "check_relpath",
    "iter_directory",
    "iter_tar",
    "measure_stage_throughput",
    "parse_ref",
    "root_hash",
    "wipe_leftovers",
]
