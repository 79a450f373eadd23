"""``sealroom up --warm N`` as an operator runs it: a real process, a real engine, a real signal.

The site keeps N containers started ahead of jobs; when the process is told to stop (SIGTERM, as
a service manager does), the gateway stops its site and nothing of a warm container outlives it:
no container, no mount of its slot. A bad count is refused before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from enclave import _mounts
from enclave._warm import WARM_LABEL
from gateway.identity import CertificateAuthority

pytestmark = pytest.mark.docker


def _sealroom(home: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from gateway.cli import main; main()",
        "--home",
        str(home),
        *args,
    ]


def _warm_containers(client: docker.DockerClient, home: Path) -> list[str]:
    """Containers of this deployment's site that are warm (started, no job given yet)."""
    found = client.api.containers(all=True, filters={"label": WARM_LABEL})
    return [
        c["Id"]
        for c in found
        if any(str(home) in (m.get("Source") or "") for m in c.get("Mounts", []))
    ]


def test_up_keeps_warm_containers_and_a_sigterm_leaves_none(
    tmp_path: Path, runtime_image: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    home = tmp_path / "home"
    CertificateAuthority.init(home / "ca")
    with (
        subprocess.Popen(
            _sealroom(home, "up", "--address", "localhost:0", "--warm", "1", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc,
        contextlib.closing(docker.from_env()) as client,
    ):
        try:
            warm = _watch_warm_then_stop(proc, client, home)
        finally:
            if proc.poll() is None:
                proc.kill()
        for cid in warm:
            with pytest.raises(docker.errors.NotFound):
                client.api.inspect_container(cid)
        assert _warm_containers(client, home) == []
    assert _mounts.mounts_under(home / "site" / "warm") == []


def _watch_warm_then_stop(
    proc: subprocess.Popen[str], client: docker.DockerClient, home: Path
) -> list[str]:
    """Wait for the listening line and the warm container, then SIGTERM; the ids it had."""
    assert proc.stdout is not None and proc.stderr is not None
    text = ""
    while not text.endswith("}\n"):  # one JSON object, printed over several lines
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        text += line
    assert json.loads(text)["port"] > 0
    deadline = time.monotonic() + 180
    while not _warm_containers(client, home) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    warm = _warm_containers(client, home)
    assert len(warm) == 1, "sealroom up --warm 1 started no warm container"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return warm


def test_up_refuses_a_negative_warm_count_before_starting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    CertificateAuthority.init(home / "ca")
    done = subprocess.run(
        _sealroom(home, "up", "--address", "localhost:0", "--warm", "-1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--warm" in done.stderr
    assert not (home / "gateway" / "state.db").exists()
