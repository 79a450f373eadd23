"""The load run (``python -m tests.bench.load``): many clients, many jobs, and what must hold.

Three phases (the standard form), each against the real gateway in its own process
(:mod:`tests.bench._serve`), its resident memory sampled throughout:

1. **fast**: C clients submit and watch N jobs in all against a site whose runs end at once
   (:class:`tests.bench._fast.FastSite`), so that the gateway is what is loaded;
2. **back-pressure**: the same with a site queue of a few slots and runs that take a while, so
   that submissions are refused; each refusal must be a clear RESOURCE_EXHAUSTED naming the
   full queue, must leave no job behind, and the client retries after a pause;
3. **containers**: M real container jobs through the embedded Docker site.

What is checked, per phase: no job lost (every accepted job reached RELEASED and the gateway
lists exactly the accepted jobs), none run twice (the site's own run count per job id: the fast
site counts runs, the Docker site reports one ``container.start`` per run), every job audited
(its submission, its policy decision and each state change, by job id), the gateway's memory
flat (resident size after the first tenth of the jobs against the end). Results go to a JSON
file and the exit status is non-zero when any check fails.

The 10,000-job form (``--form 10k``, :func:`run_scale`) asks whether the gateway's work grows with
what it has done: C clients run 10,000 jobs through one gateway on the fast site (jobs/s, p50,
p95 and p99 of submit-to-release, its memory and its store on disk at the end, and every check
above), then the cost of a submission is probed while that store holds ~10,000 jobs against a
second gateway whose store holds ~1,000: rounds of sequential submissions (each one timed, then
waited for until released, so that the gateway does nothing else meanwhile), one round against
each in turn (:mod:`tests.bench._stats`), the figure being the median over the pairs of the
ratio of their p95s (goal: at most 1.2, submission cost flat from 1,000 to 10,000 jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.client import Client
from policies.errors import ResourceExhausted, SealroomError
from tests.bench._fast import FAST_SPEC, ONE_STEP_SPEC, Home, make_home, prepare
from tests.bench._proc import RssSampler, Served
from tests.bench._stats import interleave

MB = 1 << 20
REQUIRED_ACTIONS = frozenset(
    {"job.submit", "policy.decision", "job.state", "container.start", "release.sign"}
)
RELEASED_PATH = ("APPROVED", "QUEUED", "RUNNING", "CHECKING", "RELEASED")


@dataclass(frozen=True)
class Check:
    phase: str
    name: str
    ok: bool
    detail: str


@dataclass
class Outcome:
    """What the clients saw: accepted jobs with their end state and latency, refusals."""

    accepted: dict[str, str] = field(default_factory=dict)  # job id -> final state
    latency_s: list[float] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completed_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client_loop(
    client: Client,
    jobs: int,
    spec: Callable[[int], str],
    out: Outcome,
    *,
    retry: bool,
    on_done: Callable[[], None],
) -> None:
    for i in range(jobs):
        t0 = time.perf_counter()
        while True:
            try:
                job = client.submit(spec(i))
                break
            except ResourceExhausted as e:
                with out.lock:
                    out.refusals.append(str(e))
                if not retry:
                    return
                time.sleep(random.uniform(0.05, 0.2))  # back off, then submit again
            except SealroomError as e:
                with out.lock:
                    out.errors.append(f"submit: {type(e).__name__}: {e}")
                return
        try:
            for _ in client.watch(job.id, timeout=900):
                pass
            final = client.job(job.id)
            state = str(final.state)
            if state != "RELEASED":  # say why, so that a failed check can be read
                state += ": " + "; ".join(final.reasons)[:300]
        except SealroomError as e:
            state = f"watch failed: {type(e).__name__}: {e}"
        with out.lock:
            out.accepted[job.id] = state
            out.latency_s.append(time.perf_counter() - t0)
            out.completed_at.append(time.monotonic())
        on_done()


def _drive(
    h: Home,
    address: str,
    *,
    clients: int,
    jobs: int,
    spec: Callable[[int], str],
    retry: bool,
    gw: Served,
) -> tuple[Outcome, float, list[tuple[int, int]]]:
    """``clients`` threads submit and watch ``jobs`` jobs in all. Returns what they saw, the
    seconds it took, and (jobs done, gateway RSS) at each tenth of the jobs."""
    out = Outcome()
    marks: list[tuple[int, int]] = []
    step = max(1, jobs // 10)
    done = [0]
    counter_lock = threading.Lock()

    def on_done() -> None:
        with counter_lock:
            done[0] += 1
            n = done[0]
        if n % step == 0:
            marks.append((n, gw.rss()))

    per = [jobs // clients + (1 if k < jobs % clients else 0) for k in range(clients)]
    conns = [h.client(address, "theo", timeout_s=300) for _ in range(clients)]
    threads = [
        threading.Thread(
            target=_client_loop,
            args=(conns[k], per[k], lambda i, k=k: spec(k * 100_000 + i), out),
            kwargs={"retry": retry, "on_done": on_done},
        )
        for k in range(clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    for c in conns:
        c.close()
    return out, took, sorted(marks)


def _audit_checks(phase: str, carol: Client, out: Outcome) -> list[Check]:
    missing: dict[str, list[str]] = {}
    for job_id in out.accepted:
        records = carol.audit_query(job_id=job_id, limit=1000)
        actions = {r.event.action for r in records}
        lacking = sorted(REQUIRED_ACTIONS - actions)
        to = [r.event.details.get("to") for r in records if r.event.action == "job.state"]
        if tuple(s for s in to if s in RELEASED_PATH) != RELEASED_PATH:
            lacking.append(f"state events {to}")
        if lacking:
            missing[job_id] = lacking
    sample = dict(list(missing.items())[:3])
    return [
        Check(
            phase,
            "every job audited (submit, decision, each state, run, release)",
            not missing,
            f"{len(out.accepted) - len(missing)}/{len(out.accepted)} complete"
            + (f"; e.g. {sample}" if missing else ""),
        )
    ]


def _listing_checks(phase: str, carol: Client, out: Outcome) -> list[Check]:
    listed = {j.id: j.state for j in carol.jobs()}
    not_released = {j: s for j, s in out.accepted.items() if s != "RELEASED"}
    phantom = sorted(set(listed) - set(out.accepted))
    unlisted = sorted(set(out.accepted) - set(listed))
    return [
        Check(
            phase,
            "no job lost: every accepted job reached RELEASED",
            not not_released and not out.errors,
            f"{len(out.accepted) - len(not_released)}/{len(out.accepted)} released"
            + (f"; not: {dict(list(not_released.items())[:3])}" if not_released else "")
            + (f"; client errors: {out.errors[:3]}" if out.errors else ""),
        ),
        Check(
            phase,
            "the gateway lists exactly the accepted jobs",
            not phantom and not unlisted,
            f"{len(listed)} listed, {len(out.accepted)} accepted"
            + (f"; unknown to clients: {phantom[:3]}" if phantom else "")
            + (f"; missing: {unlisted[:3]}" if unlisted else ""),
        ),
    ]


def _run_count_checks(phase: str, runs: Counter[str], out: Outcome) -> list[Check]:
    twice = {j: n for j, n in runs.items() if n > 1}
    never = [j for j in out.accepted if runs.get(j, 0) == 0]
    unknown = [j for j in runs if j not in out.accepted]
    return [
        Check(
            phase,
            "no job run twice (site-side run count per job id)",
            not twice and not never and not unknown,
            f"{sum(1 for n in runs.values() if n == 1)} jobs ran once"
            + (f"; twice or more: {dict(list(twice.items())[:3])}" if twice else "")
            + (f"; never ran: {never[:3]}" if never else "")
            + (f"; ran but unknown: {unknown[:3]}" if unknown else ""),
        )
    ]


def _memory(
    phase: str, sampler: RssSampler, marks: list[tuple[int, int]], *, slack: int
) -> tuple[dict[str, Any], Check]:
    first = marks[0][1] if marks else sampler.samples[0][1]
    last = marks[-1][1] if marks else sampler.samples[-1][1]
    figures = {
        "rss_start_mb": round(sampler.samples[0][1] / MB, 1),
        "rss_after_first_tenth_mb": round(first / MB, 1),
        "rss_end_mb": round(last / MB, 1),
        "rss_peak_mb": round(sampler.peak / MB, 1),
        "rss_at_tenths_mb": [(n, round(v / MB, 1)) for n, v in marks],
    }
    grew = last - first
    return figures, Check(
        phase,
        f"gateway memory flat (growth after the first tenth ≤ {slack // MB} MB)",
        grew <= slack,
        f"{grew / MB:+.1f} MB from job {marks[0][0] if marks else 0} to the end",
    )


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (the nearest rank below), 0 for none."""
    ordered = sorted(values) or [0.0]
    return ordered[int(q * (len(ordered) - 1))]


def _summary(took: float, out: Outcome) -> dict[str, Any]:
    lat = sorted(out.latency_s) or [0.0]
    return {
        "seconds": round(took, 2),
        "jobs": len(out.accepted),
        "jobs_per_s": round(len(out.accepted) / took, 1),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(_quantile(lat, 0.95), 3),
        "latency_p99_s": round(_quantile(lat, 0.99), 3),
        "refusals": len(out.refusals),
    }


def fast_phase(
    root: Path,
    *,
    clients: int,
    jobs: int,
    hold_s: float = 0.0,
    max_queued: int = 100,
    phase: str = "fast",
) -> tuple[dict[str, Any], list[Check]]:
    """C clients, N jobs against the fast site. With a small ``max_queued`` and a ``hold_s``
    per run it is the back-pressure phase: clients are refused and retry."""
    root.mkdir(parents=True)
    h = make_home(root)
    runs_file = root / "runs.json"
    gw = Served(
        "gateway",
        h.home,
        "--runs-out",
        str(runs_file),
        "--max-queued",
        str(max_queued),
        "--hold-s",
        str(hold_s),
        log=root / "gateway.log",
    )
    checks: list[Check] = []
    try:
        with h.client(gw.address, "olivia") as owner:
            prepare(owner, "books", tmp=root, mode="automatic")
        with RssSampler(gw.pid, every_s=0.1) as sampler:
            out, took, marks = _drive(
                h,
                gw.address,
                clients=clients,
                jobs=jobs,
                spec=lambda i: FAST_SPEC.format(name=f"load-{i}", dataset="books"),
                retry=True,
                gw=gw,
            )
        with h.client(gw.address, "carol") as carol:
            checks += _listing_checks(phase, carol, out)
            checks += _audit_checks(phase, carol, out)
            refused_audit = [
                r
                for r in carol.audit_query(action="rpc.SubmitJob", outcome="error", limit=100_000)
                if "ResourceExhausted" in json.dumps(dict(r.event.details))
            ]
    finally:
        gw.stop()
    runs: Counter[str] = Counter(json.loads(runs_file.read_text()))
    checks += _run_count_checks(phase, runs, out)
    memory, mem_check = _memory(phase, sampler, marks, slack=max(32 * MB, jobs * 32 * 1024))
    checks.append(mem_check)
    if max_queued < clients:
        clear = [m for m in out.refusals if "queue is full" in m and str(max_queued) in m]
        checks += [
            Check(
                phase,
                "back-pressure: submissions were refused while the queue was full",
                bool(out.refusals),
                f"{len(out.refusals)} refusals, all retried",
            ),
            Check(
                phase,
                "every refusal is RESOURCE_EXHAUSTED naming the full queue",
                len(clear) == len(out.refusals),
                f"{len(clear)}/{len(out.refusals)} clear; e.g. "
                f"{out.refusals[0] if out.refusals else '-'!r}",
            ),
            Check(
                phase,
                "every refusal was audited and left no job",
                len(refused_audit) == len(out.refusals),
                f"{len(refused_audit)} audited refusals for {len(out.refusals)} seen; jobs "
                "listed = jobs accepted (above)",
            ),
        ]
    return {
        **_summary(took, out),
        "clients": clients,
        "max_queued": max_queued,
        "hold_s": hold_s,
        **memory,
    }, checks


def container_phase(
    root: Path, *, clients: int, jobs: int, workers: int = 2
) -> tuple[dict[str, Any], list[Check]]:
    """``jobs`` real container jobs through the gateway's embedded Docker site."""
    import docker

    from enclave.models import ModelStore
    from tests.integration._deployment import policy
    from trainers.basemodel import create_base_model
    from trainers.synthetic import corpus, write_corpus

    phase = "containers"
    root.mkdir(parents=True)
    h = make_home(root)
    model = create_base_model(root / "tiny-lm", texts=corpus(documents=20, seed=1000), seed=0)
    ModelStore(h.home / "site" / "models").register("tiny-lm", model)
    gw = Served(
        "gateway", h.home, "--site", "docker", "--workers", str(workers), log=root / "gateway.log"
    )
    checks: list[Check] = []
    try:
        with h.client(gw.address, "olivia") as owner:
            write_corpus(root / "books", documents=4, seed=7)
            owner.register_dataset("books", root / "books")
            owner.put_policy("books", policy("books", mode="automatic", memorization=False))
        with RssSampler(gw.pid, every_s=0.2) as sampler:
            out, took, marks = _drive(
                h,
                gw.address,
                clients=min(clients, jobs),
                jobs=jobs,
                spec=lambda i: ONE_STEP_SPEC.format(name=f"load-{i}"),
                retry=True,
                gw=gw,
            )
        with h.client(gw.address, "carol") as carol:
            checks += _listing_checks(phase, carol, out)
            checks += _audit_checks(phase, carol, out)
            runs: Counter[str] = Counter(
                r.event.job_id or ""
                for r in carol.audit_query(action="container.start", limit=100_000)
            )
    finally:
        gw.stop()
    checks += _run_count_checks(phase, runs, out)
    memory, mem_check = _memory(phase, sampler, marks, slack=64 * MB)
    checks.append(mem_check)
    client = docker.from_env()
    try:
        left = [
            c
            for c in client.containers.list(all=True, filters={"label": "org.sealroom.job"})
            if c.labels.get("org.sealroom.job") in out.accepted
        ]
    finally:
        client.close()
    checks.append(
        Check(
            phase,
            "no container left behind",
            not left,
            f"{len(left)} left: {[c.name for c in left[:3]]}",
        )
    )
    return {
        **_summary(took, out),
        "clients": min(clients, jobs),
        "workers": workers,
        **memory,
    }, checks


def _store_size(home: Path) -> dict[str, float]:
    """The gateway's state and audit databases on disk (with their write-ahead logs), in MB."""
    gw = home / "gateway"

    def size(name: str) -> int:
        return sum(p.stat().st_size for p in gw.glob(f"{name}*") if p.is_file())

    state, audit = size("state.db"), size("audit.db")
    return {
        "state_db_mb": round(state / MB, 1),
        "audit_db_mb": round(audit / MB, 1),
        "store_mb": round((state + audit) / MB, 1),
    }


def _probe(client: Client, n: int, tag: str, out: Outcome, times: list[float]) -> float:
    """``n`` submissions one after another, each timed (the SubmitJob call) and then watched
    until it ends (not timed), so that the gateway is doing nothing else during the next one.
    Returns the p95 of the round; every submission goes to ``times``, every job to ``out``."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        job = client.submit(FAST_SPEC.format(name=f"{tag}-{i}", dataset="books"))
        lat.append(time.perf_counter() - t0)
        for _ in client.watch(job.id, timeout=300):
            pass
        final = client.job(job.id)
        state = str(final.state)
        if state != "RELEASED":
            state += ": " + "; ".join(final.reasons)[:300]
        with out.lock:
            out.accepted[job.id] = state
    times.extend(lat)
    return _quantile(lat, 0.95)


class _Scaled:
    """One gateway on the fast site, its dataset prepared, grown by ``jobs`` jobs of C clients."""

    def __init__(self, root: Path, *, phase: str) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.phase = phase
        self.h = make_home(root)
        self.runs_file = root / "runs.json"
        self.gw = Served(
            "gateway", self.h.home, "--runs-out", str(self.runs_file), log=root / "gateway.log"
        )
        with self.h.client(self.gw.address, "olivia") as owner:
            prepare(owner, "books", tmp=root, mode="automatic")
        self.out = Outcome()

    def grow(self, *, clients: int, jobs: int) -> tuple[float, list[tuple[int, int]], RssSampler]:
        with RssSampler(self.gw.pid, every_s=0.2) as sampler:
            out, took, marks = _drive(
                self.h,
                self.gw.address,
                clients=clients,
                jobs=jobs,
                spec=lambda i: FAST_SPEC.format(name=f"load-{i}", dataset="books"),
                retry=True,
                gw=self.gw,
            )
        self.out = out
        return took, marks, sampler

    def checks(self) -> list[Check]:
        """Every check of the load run over every job this gateway ran (the probes' too); the
        gateway is stopped afterwards."""
        checks: list[Check] = []
        try:
            with self.h.client(self.gw.address, "carol", timeout_s=600) as carol:
                checks += _listing_checks(self.phase, carol, self.out)
                checks += _audit_checks(self.phase, carol, self.out)
        finally:
            self.gw.stop()
        runs: Counter[str] = Counter(json.loads(self.runs_file.read_text()))
        return checks + _run_count_checks(self.phase, runs, self.out)


def run_scale(
    root: Path,
    *,
    clients: int,
    jobs: int = 10_000,
    small: int = 1_000,
    rounds: int = 10,
    per_round: int = 40,
    memory_slack: int = 32 * MB,
) -> dict[str, Any]:
    """The 10,000-job form (see the module docstring): ``jobs`` jobs of ``clients`` clients
    through one gateway, a second grown to ``small`` jobs, then ``rounds`` rounds of
    ``per_round`` sequential submissions against each in turn."""
    t_start = time.monotonic()
    large = _Scaled(root / "large", phase=f"fast-{jobs}")
    small_gw: _Scaled | None = None
    checks: list[Check] = []
    try:
        took, marks, sampler = large.grow(clients=clients, jobs=jobs)
        figures = {**_summary(took, large.out), "clients": clients}
        memory, mem_check = _memory(large.phase, sampler, marks, slack=memory_slack)
        figures.update(memory)
        figures["rss_growth_mb"] = round((marks[-1][1] - marks[0][1]) / MB if marks else 0.0, 1)
        checks.append(mem_check)
        small_gw = _Scaled(root / "small", phase=f"fast-{small}")
        small_gw.grow(clients=clients, jobs=small)

        times: dict[str, list[float]] = {"small": [], "large": [], "warm-up": []}
        counter = iter(range(1 << 30))
        with (
            large.h.client(large.gw.address, "theo") as on_large,
            small_gw.h.client(small_gw.gw.address, "theo") as on_small,
        ):

            def probe(client: Client, g: _Scaled, side: str) -> float:
                return _probe(client, per_round, f"probe-{next(counter)}", g.out, times[side])

            # One submission each first, not counted: the connection and its TLS handshake.
            _probe(on_large, 1, "warm-up-large", large.out, times["warm-up"])
            _probe(on_small, 1, "warm-up-small", small_gw.out, times["warm-up"])
            paired = interleave(
                lambda: probe(on_large, large, "large"),
                lambda: probe(on_small, small_gw, "small"),
                runs=rounds,
                higher_is_better=False,
            )
        del times["warm-up"]
        cost = paired.result(
            f"SubmitJob p95, store at ~{jobs} jobs vs ~{small}",
            unit="s",
            goal=1.2,
            digits=4,
            per_round=per_round,
            p50_s={k: round(statistics.median(v), 4) for k, v in times.items()},
            p95_s={k: round(_quantile(v, 0.95), 4) for k, v in times.items()},
            p99_s={k: round(_quantile(v, 0.99), 4) for k, v in times.items()},
            jobs_in_store={"small": len(small_gw.out.accepted), "large": len(large.out.accepted)},
        )
        cost["met"] = cost["ratio"] <= cost["goal"]
        checks += large.checks()
        figures.update(_store_size(large.h.home))
        checks += small_gw.checks()
    finally:
        for g in (large, small_gw):
            if g is not None and g.gw.proc.poll() is None:
                with contextlib.suppress(RuntimeError):
                    g.gw.stop()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "form": "10k",
        "seconds": round(time.monotonic() - t_start, 1),
        "phases": {large.phase: figures},
        "submission_cost": cost,
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
        "goals_met": bool(cost["met"]),
    }


def run_load(
    root: Path, *, clients: int, jobs: int, containers: int, backpressure_jobs: int | None = None
) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    checks: list[Check] = []
    figures, c = fast_phase(root / "fast", clients=clients, jobs=jobs)
    phases["fast"], checks = figures, checks + c
    figures, c = fast_phase(
        root / "backpressure",
        clients=clients,
        jobs=backpressure_jobs or max(clients, jobs // 5),
        hold_s=0.02,
        max_queued=max(2, clients // 10),
        phase="back-pressure",
    )
    phases["back-pressure"], checks = figures, checks + c
    if containers:
        figures, c = container_phase(root / "containers", clients=clients, jobs=containers)
        phases["containers"], checks = figures, checks + c
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "phases": phases,
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.load", description=__doc__)
    p.add_argument(
        "--form",
        choices=["standard", "10k"],
        default="standard",
        help="standard: fast, back-pressure and container phases; 10k: the 10,000-job form",
    )
    p.add_argument("--clients", type=int, default=50)
    p.add_argument(
        "--jobs", type=int, default=None, help="fast-site jobs (standard 1,000; 10k form 10,000)"
    )
    p.add_argument("--containers", type=int, default=50, help="real container jobs (0: none)")
    p.add_argument("--small", type=int, default=1000, help="10k form: jobs in the smaller store")
    p.add_argument("--rounds", type=int, default=10, help="10k form: probe rounds per store")
    p.add_argument("--per-round", type=int, default=40, help="10k form: submissions per round")
    p.add_argument("--out", type=Path, default=Path("load-results.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sealroom-load-") as tmp:
        if args.form == "10k":
            report = run_scale(
                Path(tmp),
                clients=args.clients,
                jobs=args.jobs or 10_000,
                small=args.small,
                rounds=args.rounds,
                per_round=args.per_round,
            )
        else:
            report = run_load(
                Path(tmp), clients=args.clients, jobs=args.jobs or 1000, containers=args.containers
            )
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for name, figures in report["phases"].items():
        print(
            f"{name}: "
            + ", ".join(f"{k}={v}" for k, v in figures.items() if not isinstance(v, list))
        )
    cost = report.get("submission_cost")
    if cost is not None:
        print(
            f"{cost['name']}: {cost['value']} s vs {cost['limit']} s, median ratio "
            f"{cost['ratio']} (spread {cost['ratio_spread']}, {cost['runs']} pairs of "
            f"{cost['per_round']}), goal <= {cost['goal']}: {'met' if cost['met'] else 'NOT met'}"
        )
    for c in report["checks"]:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['phase']}: {c['name']}: {c['detail']}")
    if "seconds" in report:
        print(f"took {report['seconds']} s")
    print(f"written to {args.out}", file=sys.stderr)
    return 0 if report["ok"] and report.get("goals_met", True) else 1


if __name__ == "__main__":
    sys.exit(main())
