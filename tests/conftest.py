"""Shared fixtures.

Docker: tests marked ``docker`` get a client from :func:`docker_client`. Where no engine answers
they are skipped on a developer's machine, and they *fail* when ``CI=true``: in CI a missing
engine is a broken set-up, never a pass. Slurm: tests marked ``slurm`` get the test cluster from
:func:`slurm_cluster` (``enclave/image/ensure-slurm.sh``), under the same rule. Every container
and volume a test run creates carries the label ``org.sealroom.test-run=<run id>`` and is
removed at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

TEST_RUN_ID = uuid.uuid4().hex[:12]
TEST_RUN_LABEL = "org.sealroom.test-run"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # the SDK raises several unrelated types here
        if _in_ci():
            pytest.fail(f"CI=true and no Docker engine answers: {e}")
        pytest.skip(f"no Docker engine answers: {e}")
    yield client
    for c in client.containers.list(all=True, filters={"label": f"{TEST_RUN_LABEL}={TEST_RUN_ID}"}):
        c.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def runtime_image(docker_client: Any) -> str:
    """The runtime image's ID (built by ``make image``; built here if missing)."""
    import docker

    try:
        return str(docker_client.images.get("sealroom-runtime:latest").id)
    except docker.errors.ImageNotFound:
        pass
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [os.path.join(top, "enclave/image/build.sh"), os.environ.get("PYTHON", "python3")],
        check=True,
    )
    return str(docker_client.images.get("sealroom-runtime:latest").id)


@pytest.fixture
def test_labels() -> dict[str, str]:
    return {TEST_RUN_LABEL: TEST_RUN_ID}


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The partition of the test cluster (two nodes, ``node-a`` and ``node-b``), started by
    ``enclave/image/ensure-slurm.sh`` if it does not answer."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [os.path.join(top, "enclave/image/ensure-slurm.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[-2000:]
        if _in_ci():
            pytest.fail(f"CI=true and the Slurm test cluster does not start: {why}")
        pytest.skip(f"no Slurm test cluster: {why}")
    return "enclave"
