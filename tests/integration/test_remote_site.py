"""A remote site as its operator runs it: its own process and home, dialling out to a gateway in
another process, with the data registered at the site and never at the gateway.

Real processes (``sealroom up`` for the gateway, ``sealroom site join`` for the site, each with
its own ``--home``), real mTLS, real Docker: the owner registers a corpus at the site (only its
metadata reaches the gateway), puts a policy through the gateway, the team's built-in job runs
at the site and its signed release verifies as the site's. Then every byte the gateway stored
is searched for the corpus's canary: none.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from enclave.identity import IdentityFiles
from enclave.provenance import verify_release
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.errors import PermissionDenied
from tests.integration._deployment import PEOPLE, policy
from tests.integration._remote import sealroom, serving, wait_for_dataset
from tests.integration._remote import site_home as make_site_home
from trainers.synthetic import write_corpus

pytestmark = pytest.mark.docker

CANARY = "zq-canary-7f3e91c2-never-at-the-gateway"
BULK = 16 << 20

SPEC = """\
name: remote
datasets: [books]
base_model: tiny-lm
trainer: causal-lm
purpose: testing
hyperparameters: {max_steps: 3, batch_size: 2, block_size: 32, seed: 0}
resources: {cpus: 1, memory_mb: 1536, timeout_s: 300}
"""


class CountingProxy:
    """A TCP relay between the site and the gateway that counts the bytes each way (the mTLS
    passes through it untouched): what the gateway received from the site, measured outside
    both."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_gateway = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if counted:
                    with self._lock:
                        self.to_gateway += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def test_a_job_runs_at_a_remote_site_and_the_data_never_reaches_the_gateway(
    tmp_path: Path, runtime_image: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    gw_home = tmp_path / "gateway-home"
    ca = CertificateAuthority.init(gw_home / "ca")
    people: dict[str, IdentityFiles] = {
        name: ca.issue(name, role=role, team=team, out_dir=gw_home / "identities")
        for name, (role, team) in PEOPLE.items()
    }
    site_home = make_site_home(tmp_path, ca, "hospital")
    books = tmp_path / "books"
    write_corpus(books, documents=4, seed=7)
    (books / "book-canary.txt").write_text(f"The ledger said {CANARY} twice: {CANARY}.\n")
    # Bulk the trainer does not read (it reads *.txt): had the data travelled, these bytes would
    # have crossed the site's connection to the gateway.
    (books / "scans.bin").write_bytes(os.urandom(BULK))
    registered = subprocess.run(
        sealroom(
            site_home,
            "site",
            "dataset",
            "register",
            "books",
            str(books),
            "--owner",
            "olivia",
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout)["version"] == 1

    with (
        serving(
            sealroom(gw_home, "up", "--address", "localhost:0", "--json"), tmp_path / "gw.log"
        ) as (_, up),
    ):
        address = f"localhost:{up['port']}"
        proxy = CountingProxy(int(str(up["port"])))
        with (
            serving(
                sealroom(
                    site_home,
                    "site",
                    "join",
                    f"localhost:{proxy.port}",
                    "--name",
                    "hospital",
                    "--json",
                ),
                tmp_path / "site.log",
            ),
            Client(address, people["olivia"]) as owner,
            Client(address, people["theo"]) as team,
            Client(address, people["carol"]) as carol,
        ):
            wait_for_dataset(owner, "books")
            # The site's hello and its push of the version's metadata: kilobytes, not the data.
            assert proxy.to_gateway < BULK // 16, proxy.to_gateway
            (record,) = [d for d in owner.datasets() if d.name == "books"]
            assert record.owner == "olivia" and record.version == 1
            owner.put_policy("books", policy("books", memorization=False))
            job = team.submit(SPEC)
            assert job.state == "PENDING_APPROVAL", job.reasons
            owner.decide(job.id, approve=True, reason="test")
            states = [e.state for e in team.watch(job.id, timeout=600)]
            assert team.job(job.id).state == "RELEASED", (states, team.job(job.id).reasons)
            dest = team.download_release(job.id, tmp_path / "release")
            verified = verify_release(dest, ca_cert_pem=ca.cert_path.read_bytes())
            assert verified.site == "hospital"
            # The counter sees real traffic: the release the site pushed went through it.
            pushed = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            assert proxy.to_gateway > pushed
            by_site = carol.audit_query(job_id=job.id, principal="hospital")
            assert {"container.start"} <= {r.event.action for r in by_site}
            (reg,) = carol.audit_query(action="dataset.register", dataset="books@v1")
            assert reg.event.principal == "hospital" and reg.event.details["owner"] == "olivia"
            # Two logs, one story: the site's own log, checkpointed into the gateway's.
            deadline = time.monotonic() + 30
            while not carol.audit_query(action="site.checkpoint", principal="hospital"):
                assert time.monotonic() < deadline, "no checkpoint of the site's own log"
                time.sleep(0.2)
            _compliance_reads_the_sites_log(tmp_path, gw_home, site_home, address, job.id)
            with pytest.raises(PermissionDenied):  # the site's records are not the team's
                team.audit_export(tmp_path / "theirs.jsonl", site="hospital")
            with pytest.raises(PermissionDenied):
                team.audit_query(site="hospital")
    # The corpus stayed at the site: not one copy of its canary anywhere under the gateway's home.
    needle = CANARY.encode()
    found = [p for p in gw_home.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert found == []
    # At the site it is kept encrypted, and the run's staging is gone.
    assert [
        p for p in (site_home / "site").rglob("*") if p.is_file() and needle in p.read_bytes()
    ] == []


def _compliance_reads_the_sites_log(
    tmp: Path, gw_home: Path, site_home: Path, address: str, job_id: str
) -> None:
    """The compliance officer fetches the site's records through the gateway, as the CLI does,
    and checks them offline against the gateway's own export; the site's operator exports the
    site's log at the site, and it passes the same check."""

    def cli(home: Path, *args: str) -> dict[str, object]:
        run = subprocess.run(
            sealroom(home, "--address", address, *args, "--json"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        doc = json.loads(run.stdout)
        assert isinstance(doc, dict | list)
        return doc if isinstance(doc, dict) else {"list": doc}

    carol = ("--as", "carol")
    records = cli(gw_home, *carol, "audit", "query", "--site", "hospital", "--job", job_id)["list"]
    assert isinstance(records, list)
    actions = {r["action"] for r in records}
    assert {"site.lease", "container.start"} <= actions, actions
    cli(gw_home, *carol, "audit", "export", "--site", "hospital", str(tmp / "site-copy.jsonl"))
    cli(gw_home, *carol, "audit", "export", str(tmp / "gateway.jsonl"))
    cli(site_home, "site", "audit-export", str(tmp / "site-own.jsonl"), "--name", "hospital")
    for export in ("site-copy.jsonl", "site-own.jsonl"):
        checked = cli(
            gw_home,
            "audit",
            "verify",
            str(tmp / export),
            "--site-cert",
            str(tmp / f"{export}.signer.pem"),
            "--gateway-export",
            str(tmp / "gateway.jsonl"),
        )
        assert checked["valid"] is True and checked["site"] == "hospital"
        assert int(str(checked["recorded"])) >= 1
        assert int(str(checked["latest_recorded"])) <= int(str(checked["size"]))
    # The signed checkpoint of the site's log, fetched through the gateway, verifies under the
    # site's key (checked against the deployment CA), and a record of it proves its inclusion.
    cp = cli(gw_home, *carol, "audit", "checkpoint", "--site", "hospital")
    assert int(str(cp["size"])) >= len(records)
    proved = cli(gw_home, *carol, "audit", "prove", "--site", "hospital", str(records[0]["seq"]))
    assert proved["verified"] is True
