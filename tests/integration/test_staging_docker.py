"""Staging and the access ledger with a real container: the staged directory is bind-mounted
read-only at /data/<name>, and opens made inside the container are seen from the host."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from enclave.ledger import AccessLedger
from enclave.vault import Staging, Vault, wipe_leftovers

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="staging mounts a tmpfs: needs root"),
]

MARKER = "SEALROOM-DOCKER-MARKER-5e2b"
FILES = {
    "one.txt": f"{MARKER} first\n".encode(),
    "two.txt": f"{MARKER} second\n".encode(),
    "three.txt": f"{MARKER} third\n".encode(),
}


@pytest.fixture
def staged(tmp_path: Path):
    vault = Vault(tmp_path / "vault", site_key_path=tmp_path / "site.key")
    v = vault.register(
        "corpus", [(p, io.BytesIO(b)) for p, b in FILES.items()], max_bytes=1 << 20, max_files=10
    )
    root = tmp_path / "staging"
    root.mkdir()
    st = vault.stage("dock-1", [v], dest_root=root, on_event=lambda e: None)
    yield vault, st
    st.destroy()
    wipe_leftovers(root)


def run_in_container(
    client: Any, image: str, labels: dict[str, str], st: Staging, argv: list[str]
) -> tuple[int, str, str]:
    container = client.containers.create(
        image,
        entrypoint=argv[:1],
        command=argv[1:],
        user="10001:10001",
        network_disabled=True,
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        volumes={str(st.path("corpus")): {"bind": "/data/corpus", "mode": "ro"}},
        labels=labels,
    )
    try:
        container.start()
        code = container.wait(timeout=60)["StatusCode"]
        return (
            code,
            container.logs(stdout=True, stderr=False).decode(),
            container.logs(stdout=False, stderr=True).decode(),
        )
    finally:
        container.remove(force=True)


def test_ledger_names_exactly_the_file_the_container_read(
    docker_client: Any, runtime_image: str, test_labels: dict[str, str], staged
) -> None:
    _vault, st = staged
    with AccessLedger.for_staging(st) as ledger:
        code, out, err = run_in_container(
            docker_client, runtime_image, test_labels, st, ["cat", "/data/corpus/two.txt"]
        )
    assert (code, out, err) == (0, f"{MARKER} second\n", "")
    summary = ledger.stop()
    assert summary.complete
    assert [(r.job_id, r.dataset, r.path, r.opens) for r in summary.records] == [
        ("dock-1", "corpus@v1", "two.txt", 1)
    ]


def test_container_sees_the_files_and_cannot_write_them(
    docker_client: Any, runtime_image: str, test_labels: dict[str, str], staged
) -> None:
    _vault, st = staged
    script = (
        "ls /data/corpus; "
        "echo x > /data/corpus/one.txt && echo WROTE; "
        "touch /data/corpus/new && echo CREATED; "
        "rm -f /data/corpus/three.txt && echo REMOVED; "
        "exit 0"
    )
    with AccessLedger.for_staging(st) as ledger:
        code, out, err = run_in_container(
            docker_client, runtime_image, test_labels, st, ["/bin/sh", "-c", script]
        )
    assert code == 0
    assert out.splitlines() == ["one.txt", "three.txt", "two.txt"]  # and no WROTE/CREATED/...
    assert err.count("Read-only file system") == 3, err
    # A refused open-for-writing never opened anything, and listing is not reading.
    assert ledger.stop().records == ()
    assert (st.path("corpus") / "one.txt").read_bytes() == FILES["one.txt"]


def test_no_plaintext_left_on_the_host_after_the_job(
    docker_client: Any, runtime_image: str, test_labels: dict[str, str], staged
) -> None:
    vault, st = staged
    code, _, _ = run_in_container(
        docker_client, runtime_image, test_labels, st, ["cat", "/data/corpus/one.txt"]
    )
    assert code == 0
    st.destroy()
    for base in (vault.root, st.root.parent):
        hits = subprocess.run(["grep", "-rlF", MARKER, str(base)], capture_output=True)
        assert hits.returncode == 1, hits.stdout
