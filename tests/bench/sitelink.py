"""Bench entry for the site link: a remote site's transfers against raw TLS, in the same run.

``bench_site_link``: a gateway in its own process serves one remote site, which runs here, in
this process, as the site agent runs it (:class:`enclave.link.SiteLink` over mTLS, a
:class:`~tests.bench._fast.FastSite` that signs its releases). Each run, a custom job with an
S-byte bundle goes to the site: the site fetches the bundle (FetchBundle, gateway to site, file
to file, checked against the order's hash) and pushes a signed release of S bytes (PushRelease,
site to gateway, which stores it and verifies it against its manifest). Their times, taken at
the site, are paired with raw TLS over loopback moving the same S bytes file to file with the
same certificates (a GET for the fetch, a PUT for the push), in turns. The gateway's resident
growth during each run shows that both stream (constant memory).
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from sealroom.v1 import site_pb2 as pb

from enclave.link import PushedDataset, SiteLink
from enclave.provenance import SiteSigner
from gateway.identity import CertificateAuthority
from policies.identity import Role
from tests.bench._fast import CUSTOM_SPEC, FastSite, make_home, write_payload
from tests.bench._proc import RssSampler, Served
from tests.bench._stats import Paired
from tests.bench.gateway import MB, _rss_growth, _rss_result, _tls_context, _tls_get, _tls_put
from tests.integration._deployment import policy

SITE = "bench-site"
DATASET = "kept-at-site"


class _TimedLink(SiteLink):
    """The site link as the site runs it, timing its two bulk transfers of each run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.took: dict[str, dict[str, float]] = {}

    def _fetch(self, lease: pb.Lease, dest: Path) -> Path:
        t0 = time.perf_counter()
        out = super()._fetch(lease, dest)
        self.took.setdefault(lease.job_id, {})["fetch"] = time.perf_counter() - t0
        return out

    def _push_release(self, job_id: str, root: Path) -> None:
        t0 = time.perf_counter()
        super()._push_release(job_id, root)
        self.took.setdefault(job_id, {})["push"] = time.perf_counter() - t0


def _dataset_archive() -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"texts kept at the site\n" * 64
        info = tarfile.TarInfo("doc-0.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def bench_site_link(tmp: Path, *, quick: bool) -> list[dict[str, Any]]:
    size = (256 if quick else 2048) * MB
    runs = 2 if quick else 3
    h = make_home(tmp)
    ca = CertificateAuthority.load(h.home / "ca")
    ids = tmp / "site-identities"
    tls = ca.issue(SITE, role=Role.SITE, out_dir=ids)
    signer_files = ca.site_signer(SITE, out_dir=ids)
    signer = SiteSigner.from_files(cert=signer_files.cert, key=signer_files.key)
    data = tmp / "data"
    data.mkdir()
    source = write_payload(data / "bundle.bin", size)
    gw = Served(
        "gateway",
        h.home,
        "--site",
        "remote",
        "--release-bytes",
        str(size),
        "--max-bundle-bytes",
        str(size + MB),
        log=tmp / "gateway.log",
    )
    sink = Served("tls", h.home, "--dir", str(data), "--source", str(source), log=tmp / "tls.log")
    site = FastSite(tmp / "site", release_bytes=size, signer=signer)
    stored = site.store_dataset(DATASET, archive=_dataset_archive())
    link = _TimedLink(
        site,
        address=gw.address,
        identity=tls,
        state=tmp / "link",
        slots=1,
        datasets=lambda: [PushedDataset(stored, "olivia")],
    )
    serving = threading.Thread(target=link.serve, name="site-link", daemon=True)
    serving.start()
    fetch, push = Paired(), Paired()
    rss: list[tuple[int, int, int]] = []
    ctx = _tls_context(h.identities["theo"])
    mb = size / MB
    try:
        if not link.connected.wait(60):
            raise RuntimeError("the site did not connect to the gateway")
        with h.client(gw.address, "olivia") as owner, h.client(gw.address, "theo") as team:
            deadline = time.monotonic() + 60
            while DATASET not in {d.name for d in owner.datasets()}:
                if time.monotonic() > deadline:
                    raise RuntimeError("the site did not tell the gateway of its dataset")
                time.sleep(0.1)
            owner.put_policy(
                DATASET, policy(DATASET, mode="manual", custom_code=True, memorization=False)
            )
            for i in range(runs):
                got_file = data / "got.bin"
                raw_get = _tls_get(sink.port, ctx, got_file, size)
                got_file.unlink()
                raw_put = _tls_put(sink.port, ctx, source, size)
                for p in data.glob("put-*"):
                    p.unlink()
                before = gw.rss()
                with RssSampler(gw.pid) as sampler:
                    job = team.submit(
                        CUSTOM_SPEC.format(name=f"site-{i}", dataset=DATASET), bundle=source
                    )
                    if job.state != "PENDING_APPROVAL":
                        raise RuntimeError(f"job {job.id} is {job.state}: {list(job.reasons)}")
                    owner.decide(job.id, approve=True, reason="bench")
                    for event in team.watch(job.id, timeout=900):
                        if event.state == "AWAITING_REVIEW":
                            break  # custom code: held for the owner, pushed and verified
                done = team.job(job.id)
                if done.state not in ("RELEASED", "AWAITING_REVIEW"):
                    raise RuntimeError(f"job {job.id} ended {done.state}: {list(done.reasons)}")
                took = link.took[job.id]
                fetch.add(mb / took["fetch"], mb / raw_get)
                push.add(mb / took["push"], mb / raw_put)
                rss.append((_rss_growth(sampler, before), before, sampler.peak))
    finally:
        link.stop()
        serving.join(timeout=60)
        gw.stop()
        sink.stop()
    label = f"{mb / 1024:g} GB" if mb >= 1024 else f"{mb:g} MB"
    return [
        fetch.result(
            f"site link: FetchBundle of a {label} bundle to a remote site vs raw TLS",
            unit="MB/s",
            goal=0.8,
            digits=1,
            bytes=size,
            note="file to file, the site checking the bundle's SHA-256 against its order",
        ),
        push.result(
            f"site link: PushRelease of a {label} signed release from a remote site vs raw TLS",
            unit="MB/s",
            goal=0.8,
            digits=1,
            bytes=size,
            note="file to file; the gateway stores it and verifies every file's SHA-256",
        ),
        _rss_result(f"the site link's {label} runs (fetch and push)", rss, size),
    ]
