"""The container runtime of a site: the :class:`Runtime` contract and its backends.

:class:`DockerRuntime` is the real backend; :class:`FakeRuntime` runs a Python callable in-process
for tests that need a fast site. The isolation promises are on :class:`Runtime`.
"""

from enclave.runtime._base import (
    JOB_LABEL,
    MANAGED_LABEL,
    ContainerSpec,
    ContainerStatus,
    Handle,
    RunState,
    Runtime,
    TailBuffer,
    cap_tail,
    check_mount_sources,
)
from enclave.runtime.docker import DockerRuntime, container_options
from enclave.runtime.fake import FakeJob, FakeRuntime

__all__ = [
    "JOB_LABEL",
    "MANAGED_LABEL",
    "ContainerSpec",
    "ContainerStatus",
    "DockerRuntime",
    "FakeJob",
    "FakeRuntime",
    "Handle",
    "RunState",
    "Runtime",
    "TailBuffer",
    "cap_tail",
    "check_mount_sources",
    "container_options",
]
