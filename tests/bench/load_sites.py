"""The load run's many-sites form (``python -m tests.bench.load_sites``): one gateway, S remote
sites, each its own process dialling in over the site link, and N jobs spread over them.

Every site is a fast site (its runs end at once: the gateway and the link are what is loaded)
that signs its releases as a real site does, keeps one dataset of its own and its own audit log.
C clients submit and watch the jobs, each naming one site's dataset (round robin), under
automatic approval. What must hold: no job lost (every accepted job RELEASED, the gateway lists
exactly those), none run twice (each site's own run count per job id, over all sites), every
job audited on both sides (the gateway's records of submission, decision, each state, the run
and the release; the site's own log holds its lease of it, and the gateway's log holds
checkpoints of every site's log), and the gateway's memory flat. Figures: jobs/s, p50/p95/p99
of submit-to-release, the gateway's memory. The exit status is non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography import x509

from enclave.audit import AuditLog
from gateway.identity import CertificateAuthority
from policies.identity import Role
from tests.bench._fast import FAST_SPEC, make_home
from tests.bench._proc import RssSampler, Served
from tests.bench.load import (
    MB,
    Check,
    _audit_checks,
    _drive,
    _listing_checks,
    _memory,
    _run_count_checks,
    _summary,
)
from tests.integration._deployment import policy


def run_sites(root: Path, *, sites: int, jobs: int, clients: int) -> dict[str, Any]:
    h = make_home(root)
    ca = CertificateAuthority.load(h.home / "ca")
    names = [f"site-{i:02d}" for i in range(sites)]
    homes = {}
    for name in names:
        home = root / name
        (home / "ca").mkdir(parents=True)
        shutil.copy(ca.cert_path, home / "ca" / "ca.pem")
        ca.issue(name, role=Role.SITE, out_dir=home / "identities")
        ca.site_signer(name, out_dir=home / "identities")
        homes[name] = home
    gw = Served(
        "gateway",
        h.home,
        "--site",
        "remote",
        "--workers",
        str(max(2 * sites, clients)),
        "--max-queued",
        str(jobs),
        log=root / "gateway.log",
    )
    served: list[Served] = []
    checks: list[Check] = []
    phase = f"{sites} sites"
    try:
        for name in names:
            served.append(
                Served(
                    "site",
                    homes[name],
                    "--gateway",
                    gw.address,
                    "--name",
                    name,
                    "--workers",
                    "4",
                    "--runs-out",
                    str(root / f"runs-{name}.json"),
                    log=root / f"{name}.log",
                )
            )
        with h.client(gw.address, "olivia") as owner:
            deadline = time.monotonic() + 120
            while len({d.name for d in owner.datasets()}) < sites:
                if time.monotonic() > deadline:
                    raise RuntimeError("not every site told the gateway of its dataset")
                time.sleep(0.2)
            for name in names:
                dataset = f"d-{name}"
                owner.put_policy(dataset, policy(dataset, mode="automatic", memorization=False))
        with h.client(gw.address, "oscar") as oscar:
            connected = sum(1 for s in oscar.sites() if s.connected)
        checks.append(
            Check(phase, "every site connected at once", connected == sites, f"{connected}")
        )
        turn = itertools.count()  # the jobs go round the sites
        with RssSampler(gw.pid, every_s=0.1) as sampler:
            out, took, marks = _drive(
                h,
                gw.address,
                clients=clients,
                jobs=jobs,
                spec=lambda i: FAST_SPEC.format(
                    name=f"fed-{i}", dataset=f"d-{names[next(turn) % sites]}"
                ),
                retry=True,
                gw=gw,
            )
        with h.client(gw.address, "carol") as carol:
            checks += _listing_checks(phase, carol, out)
            checks += _audit_checks(phase, carol, out)
            cps = {
                name: len(carol.audit_query(action="site.checkpoint", principal=name))
                for name in names
            }
    finally:
        for s in served:
            s.stop()
        gw.stop()
    runs: Counter[str] = Counter()
    per_site: dict[str, int] = {}
    for name in names:
        got = json.loads((root / f"runs-{name}.json").read_text())
        per_site[name] = sum(got.values())
        runs.update(got)
    checks += _run_count_checks(phase, runs, out)
    leased = Counter[str]()
    for name in names:
        log = AuditLog.open_readonly(
            homes[name] / "audit" / "audit.db",
            public_key=_signer_key(homes[name] / "identities" / f"{name}-signer.pem"),
        )
        try:
            leased.update(r.event.job_id or "" for r in log.query(action="site.lease", limit=10**7))
        finally:
            log.close()
    unleased = [j for j in out.accepted if leased.get(j, 0) != 1]
    checks += [
        Check(
            phase,
            "every job in exactly one site's own log (its lease)",
            not unleased,
            f"{len(out.accepted) - len(unleased)}/{len(out.accepted)}"
            + (f"; e.g. {unleased[:3]}" if unleased else ""),
        ),
        Check(
            phase,
            "every site's log checkpointed into the gateway's",
            all(n >= 1 for n in cps.values()),
            f"checkpoints per site: min {min(cps.values())}, max {max(cps.values())}",
        ),
    ]
    memory, mem_check = _memory(phase, sampler, marks, slack=max(32 * MB, jobs * 32 * 1024))
    checks.append(mem_check)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "phases": {
            phase: {
                **_summary(took, out),
                "sites": sites,
                "clients": clients,
                "runs_per_site_min": min(per_site.values()),
                "runs_per_site_max": max(per_site.values()),
                **memory,
            }
        },
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def _signer_key(cert_path: Path) -> Any:
    """The Ed25519 key a site signs its log's checkpoints with, from its signer certificate."""
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.load_sites", description=__doc__)
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("load-sites-results.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sealroom-load-sites-") as tmp:
        report = run_sites(Path(tmp), sites=args.sites, jobs=args.jobs, clients=args.clients)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for name, figures in report["phases"].items():
        print(
            f"{name}: "
            + ", ".join(f"{k}={v}" for k, v in figures.items() if not isinstance(v, list))
        )
    for c in report["checks"]:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['phase']}: {c['name']}: {c['detail']}")
    print(f"written to {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
