"""The leakage ledger (issue 15, item 3): the ε and bit tallies a decision reads are kept as jobs
change, in the transaction of the change, instead of being recomputed from every released job's
manifest (ε) and every job row (bits) at each submission.

What must hold: the ledger's tallies equal what the gateway computed before it (kept here as
``_today_epsilon``/``_today_bits``, the code it replaced) over a store of every kind of job; a
store from before the ledger is charged once, the same way, when it is opened; and no state change
can be persisted without its charge (a failure or a crash between them leaves neither).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from enclave.provenance.federated import SCHEMA as FEDERATED
from gateway import _ledger as ledger_module
from gateway._leakage import bits_spent, epsilon_spent, release_charges
from gateway._ledger import BITS, EPSILON, WORST
from gateway._records import job_row
from gateway.store import JobRecord, PinnedDataset, Store
from policies.lifecycle import JobState

S = JobState
TO_RUNNING = (S.APPROVED, S.QUEUED, S.RUNNING)
NAMES = ["books", "medical", "news"]


# -- what the gateway computed before the ledger (the code it replaced, verbatim in substance) --


def _today_epsilon(store: Store, releases: Path, names: list[str]) -> dict[str, float]:
    spent = dict.fromkeys(names, 0.0)
    worst = sys.float_info.max
    for job in store.jobs(state=JobState.RELEASED):
        touched = {d.name for d in job.datasets if d.name in spent}
        if not touched:
            continue
        charged = dict.fromkeys(touched, 0.0)
        try:
            manifest = json.loads((releases / job.id / "manifest.json").read_bytes())
            for gate in manifest["gates"]:
                if gate["dataset"] not in charged:
                    continue
                for check in gate["checks"]:
                    if check["name"] == "dp":
                        eps = check["figures"].get("epsilon", worst)
                        ok = isinstance(eps, int | float) and not isinstance(eps, bool)
                        ok = ok and math.isfinite(eps) and eps >= 0
                        charged[gate["dataset"]] = float(eps) if ok else worst
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            charged = dict.fromkeys(touched, worst)
        for name, eps in charged.items():
            spent[name] = min(worst, spent[name] + eps)
    return spent


def _today_bits(store: Store, names: list[str]) -> dict[str, float]:
    rows = store._conn.execute(
        "SELECT datasets, json_extract(owner_record, '$.channel_bits') FROM jobs "
        "WHERE json_extract(owner_record, '$.channel_bits') > 0"
    ).fetchall()
    used: dict[str, float] = {}
    for datasets, bits in rows:
        for name, _, _ in json.loads(datasets):
            used[name] = used.get(name, 0.0) + float(bits)
    return {name: used.get(name, 0.0) for name in names}


# -- a store of every kind of job --------------------------------------------------------------


def _job(job_id: str, datasets: list[str]) -> JobRecord:
    return JobRecord(
        id=job_id,
        name="t",
        state=S.SUBMITTED,
        submitter="theo",
        team="model-team",
        spec="{}",
        spec_sha256="s",
        bundle_sha256="",
        datasets=tuple(PinnedDataset(n, 1, "h") for n in datasets),
        policy_versions=dict.fromkeys(datasets, 1),
    )


def _manifest(releases: Path, job_id: str, content: Any) -> None:
    (releases / job_id).mkdir(parents=True, exist_ok=True)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (releases / job_id / "manifest.json").write_bytes(raw)


def _gates(per_dataset: dict[str, float | None]) -> dict[str, Any]:
    """A manifest whose gate for each dataset ran a DP check charging the figure (None: no DP
    check ran on that dataset)."""
    gates = []
    for name, eps in per_dataset.items():
        checks: list[dict[str, Any]] = [{"name": "artifacts", "passed": True, "figures": {}}]
        if eps is not None:
            checks.append({"name": "dp", "passed": True, "figures": {"epsilon": eps}})
        gates.append({"dataset": name, "rules_version": "v", "checks": checks})
    return {"gates": gates}


def _run(store: Store, job_id: str, end: JobState, *, bits: float = 0.0) -> None:
    """Walk a submitted job to ``end`` the way the gateway does (bits charged on RUNNING)."""
    store.transition(job_id, S.APPROVED)
    if end is S.CANCELLED:
        store.transition(job_id, S.CANCELLED)
        return
    store.transition(job_id, S.QUEUED)
    store.transition(job_id, S.RUNNING, channel_bits=bits)
    if end is S.FAILED:
        store.transition(job_id, S.FAILED)
        return
    store.transition(job_id, S.CHECKING)
    if end is not S.CHECKING:
        store.transition(job_id, end)


def _mixed_store(store: Store, releases: Path, rng: random.Random, jobs: int = 60) -> None:
    """Released (with and without DP checks, several datasets, a non-finite or negative figure,
    a figure written as text, an unreadable, unparsable or gate-less manifest), rejected, failed,
    cancelled and still-checking jobs, each with channel bits or none."""
    kinds = ["dp", "no-dp", "nan", "neg", "text", "missing", "garbage", "gateless", "int"]
    for i in range(jobs):
        names = rng.sample(NAMES, rng.randint(1, 3))
        job_id = f"job-{i:03d}"
        store.add_job(_job(job_id, names))
        end = rng.choice([S.RELEASED] * 4 + [S.REJECTED, S.FAILED, S.CANCELLED, S.CHECKING])
        kind = rng.choice(kinds)
        if end is not S.CANCELLED:  # a release directory was staged before the end
            if kind == "dp":
                _manifest(releases, job_id, _gates({n: rng.randint(1, 16) / 8 for n in names}))
            elif kind == "no-dp":
                _manifest(releases, job_id, _gates(dict.fromkeys(names)))
            elif kind == "nan":
                _manifest(releases, job_id, _gates({n: math.nan for n in names}))
            elif kind == "neg":
                _manifest(releases, job_id, _gates({n: -1.0 for n in names}))
            elif kind == "text":
                _manifest(releases, job_id, _gates({n: "0.5" for n in names}))  # type: ignore[misc]
            elif kind == "int":
                _manifest(releases, job_id, _gates({n: 1 for n in names}))
            elif kind == "garbage":
                _manifest(releases, job_id, b"\x00not json")
            elif kind == "gateless":
                _manifest(releases, job_id, {"job": job_id})  # the fast site's manifest
            # "missing": no manifest at all
        bits = rng.choice([0.0, 0.0, 0.5, 1.25, 3.0])
        _run(store, job_id, end, bits=bits)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    releases = tmp_path / "releases"
    releases.mkdir()
    store = Store(tmp_path / "state.db")
    store.keep_ledger(release_charges(releases))
    yield store, releases
    store.close()


# -- the ledger equals today's computation ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_ledger_equals_todays_tallies_over_a_mixed_store(
    ledger: tuple[Store, Path], seed: int
) -> None:
    store, releases = ledger
    _mixed_store(store, releases, random.Random(seed))
    states = {j.state for j in store.jobs()}
    assert {S.RELEASED, S.REJECTED, S.FAILED, S.CANCELLED} <= states
    for names in [NAMES, *([n] for n in NAMES), ["books", "news"], ["nobody"]]:
        assert epsilon_spent(store, names) == _today_epsilon(store, releases, names)
        assert bits_spent(store, names) == _today_bits(store, names)
    # The mix exercised both sides of the fail-closed rule, and jobs that charged nothing.
    charged = [v for j in store.jobs() for (_, k), v in store.charges(j.id).items() if k == EPSILON]
    assert WORST in charged and 0.0 in charged and any(0 < v < WORST for v in charged)


def test_only_released_jobs_are_charged_epsilon_and_started_jobs_bits(
    ledger: tuple[Store, Path],
) -> None:
    store, releases = ledger
    for job_id, end in [("r", S.RELEASED), ("x", S.REJECTED), ("f", S.FAILED), ("c", S.CHECKING)]:
        store.add_job(_job(job_id, ["books"]))
        _manifest(releases, job_id, _gates({"books": 1.5}))
        _run(store, job_id, end, bits=2.0)
    assert epsilon_spent(store, ["books"]) == {"books": 1.5}
    assert bits_spent(store, ["books"]) == {"books": 8.0}
    assert store.charges("r") == {("books", EPSILON): 1.5, ("books", BITS): 2.0}
    assert store.charges("x") == {("books", BITS): 2.0}


def test_epsilon_is_read_once_at_release_from_the_signed_manifest(
    ledger: tuple[Store, Path],
) -> None:
    """Read at the transition to RELEASED: the release store's copy is what the owners saw; a
    manifest that disappears afterwards takes nothing back (and charges nothing more)."""
    store, releases = ledger
    store.add_job(_job("j", ["books"]))
    _manifest(releases, "j", _gates({"books": 2.0}))
    _run(store, "j", S.RELEASED)
    (releases / "j" / "manifest.json").unlink()
    assert epsilon_spent(store, ["books"]) == {"books": 2.0}


def test_the_tally_is_the_exact_sum_whatever_the_order(ledger: tuple[Store, Path]) -> None:
    """Figures that are not dyadic: the tally is the exact sum rounded once, the same in any
    order of release (today's sum depended on the jobs' order; it differs by rounding only)."""
    store, releases = ledger
    rng = random.Random(7)
    figures = [rng.uniform(0, 3) for _ in range(40)]
    for i, eps in enumerate(figures):
        store.add_job(_job(f"j{i}", ["books"]))
        _manifest(releases, f"j{i}", _gates({"books": eps}))
    for i in rng.sample(range(len(figures)), len(figures)):  # released in another order
        _run(store, f"j{i}", S.RELEASED)
    spent = epsilon_spent(store, ["books"])["books"]
    assert spent == float(sum(Fraction(x) for x in figures))
    assert spent == pytest.approx(_today_epsilon(store, releases, ["books"])["books"], rel=1e-14)


def test_bits_follow_the_jobs_current_figure_without_residue(ledger: tuple[Store, Path]) -> None:
    store, _ = ledger
    store.add_job(_job("a", ["books", "news"]))
    store.add_job(_job("b", ["books"]))
    for job_id in ("a", "b"):
        for state in TO_RUNNING:
            store.transition(job_id, state, channel_bits=0.1 if state is S.RUNNING else 0.0)
    assert bits_spent(store, ["books", "news"]) == {"books": 0.2, "news": 0.1}
    store.update_job("a", channel_bits=0.3)
    store.update_job("a", channel_bits=0.1)
    assert bits_spent(store, ["books", "news"]) == {"books": 0.2, "news": 0.1}
    store.update_job("b", channel_bits=0.0)
    assert bits_spent(store, ["books", "news"]) == {"books": 0.1, "news": 0.1}
    assert bits_spent(store, ["books"]) == _today_bits(store, ["books"])


@pytest.mark.parametrize("bits", [math.inf, math.nan])
def test_non_finite_bits_fail_closed(ledger: tuple[Store, Path], bits: float) -> None:
    """Today such a figure made every later tally query fail (SQLite reads NaN/Infinity in
    JSON as malformed): every submission was refused. The ledger charges everything instead."""
    store, _ = ledger
    store.add_job(_job("a", ["books"]))
    for state in TO_RUNNING:
        store.transition("a", state, channel_bits=bits if state is S.RUNNING else 0.0)
    assert bits_spent(store, ["books"]) == {"books": WORST}


def test_a_manifest_malformed_in_another_datasets_gate_charges_every_dataset(
    ledger: tuple[Store, Path],
) -> None:
    """The one case where the ledger charges more than today's read: a manifest whose gate for
    one dataset is malformed. Today the other dataset was charged its figure when asked about
    alone, and everything when asked about with the first; the ledger reads a job's manifest
    once, for all of its datasets, and fails closed for all of them."""
    store, releases = ledger
    store.add_job(_job("j", ["books", "news"]))
    manifest = _gates({"books": 1.0})
    manifest["gates"].append({"dataset": "news"})  # no checks: malformed
    _manifest(releases, "j", manifest)
    _run(store, "j", S.RELEASED)
    assert _today_epsilon(store, releases, ["books"]) == {"books": 1.0}
    assert _today_epsilon(store, releases, NAMES)["books"] == WORST
    assert epsilon_spent(store, ["books"]) == {"books": WORST}


def test_a_deeply_nested_manifest_fails_closed_rather_than_raising(
    ledger: tuple[Store, Path],
) -> None:
    store, releases = ledger
    store.add_job(_job("j", ["books"]))
    _manifest(releases, "j", b"[" * 100_000 + b"]" * 100_000)
    _run(store, "j", S.RELEASED)
    assert epsilon_spent(store, ["books"]) == {"books": WORST}


# -- migration of a store from before the ledger ----------------------------------------------

OLD_SCHEMA = """
CREATE TABLE datasets (
    name TEXT NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL, root_hash TEXT NOT NULL,
    size INTEGER NOT NULL, files TEXT NOT NULL, description TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE policies (
    dataset TEXT NOT NULL, version INTEGER NOT NULL, document TEXT NOT NULL,
    sha256 TEXT NOT NULL, author TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (dataset, version));
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, submitter TEXT NOT NULL,
    team TEXT NOT NULL, spec TEXT NOT NULL, spec_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL, datasets TEXT NOT NULL, policy_versions TEXT NOT NULL,
    reasons TEXT NOT NULL, image_id TEXT NOT NULL, metrics TEXT NOT NULL,
    release_id TEXT NOT NULL, binding TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    owner_record TEXT NOT NULL DEFAULT '{}');
CREATE INDEX jobs_state ON jobs (state);
CREATE TABLE approvals (
    job_id TEXT NOT NULL, owner TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
    binding TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (job_id, owner));
"""


def test_a_store_from_before_the_ledger_is_charged_once_as_today(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    # Today's gateway fills a store; its rows are copied into a database of the old schema.
    scratch = Store(tmp_path / "scratch.db")
    scratch.keep_ledger(release_charges(releases))
    _mixed_store(scratch, releases, random.Random(3), jobs=80)
    rows = [job_row(j) for j in scratch.jobs()]
    scratch.close()
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(OLD_SCHEMA)
    old.executemany(f"INSERT INTO jobs VALUES ({', '.join('?' * 18)})", rows)
    old.commit()
    old.close()

    store = Store(tmp_path / "old.db")
    assert bits_spent(store, NAMES) == _today_bits(store, NAMES)  # bits: on opening
    store.keep_ledger(release_charges(releases))  # ε: once the gateway says where releases are
    for names in [NAMES, *([n] for n in NAMES)]:
        assert epsilon_spent(store, names) == _today_epsilon(store, releases, names)
    before = epsilon_spent(store, NAMES)
    store.close()

    # Once: opened again (a manifest changed on disk meanwhile), nothing is charged twice or
    # read again.
    for job in releases.iterdir():
        (job / "manifest.json").write_text(json.dumps(_gates(dict.fromkeys(NAMES, 9.0))))
    again = Store(tmp_path / "old.db")
    again.keep_ledger(release_charges(releases))
    assert epsilon_spent(again, NAMES) == before
    assert bits_spent(again, NAMES) == _today_bits(again, NAMES)
    again.close()


def test_a_store_from_before_the_leakage_account_migrates(tmp_path: Path) -> None:
    """Older still: no owner_record column. No bits, and the jobs' ε from their releases."""
    releases = tmp_path / "releases"
    _manifest(releases, "j", _gates({"books": 0.75}))
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(OLD_SCHEMA.replace(",\n    owner_record TEXT NOT NULL DEFAULT '{}'", ""))
    row = job_row(replace(_job("j", ["books"]), state=S.RELEASED))
    old.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * 17)})", row[:17])
    old.commit()
    old.close()
    store = Store(tmp_path / "old.db")
    store.keep_ledger(release_charges(releases))
    assert epsilon_spent(store, ["books"]) == {"books": 0.75}
    assert bits_spent(store, ["books"]) == {"books": 0.0}
    store.close()


# -- no state change without its charge ---------------------------------------------------------


def test_a_release_whose_charge_fails_is_not_released(
    ledger: tuple[Store, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, releases = ledger
    store.add_job(_job("j", ["books"]))
    _manifest(releases, "j", _gates({"books": 1.0}))
    _run(store, "j", S.CHECKING)

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ledger_module, "_tally", broken)
    with pytest.raises(sqlite3.OperationalError):
        store.transition("j", S.RELEASED)
    assert store.job("j").state is S.CHECKING and store.charges("j") == {}
    with pytest.raises(sqlite3.OperationalError):  # bits: the run is not RUNNING without them
        store.add_job(_job("k", ["books"]))
        for state in TO_RUNNING:
            store.transition("k", state, channel_bits=1.0 if state is S.RUNNING else 0.0)
    assert store.job("k").state is S.QUEUED
    monkeypatch.undo()
    store.transition("j", S.RELEASED)
    assert epsilon_spent(store, ["books"]) == {"books": 1.0}


def test_a_store_without_a_ledger_refuses_to_release(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.add_job(_job("j", ["books"]))
    _run(store, "j", S.CHECKING)
    with pytest.raises(Exception, match="no ledger"):
        store.transition("j", S.RELEASED)
    assert store.job("j").state is S.CHECKING
    store.close()


CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from gateway._leakage import release_charges
    from gateway.store import Store
    from policies.lifecycle import JobState

    db, releases = Path(sys.argv[1]), Path(sys.argv[2])
    read = release_charges(releases)

    def crash_after_reading(job):
        read(job)
        os._exit(9)  # the process dies: the job's row is rewritten, its charge not yet written

    store = Store(db)
    store.keep_ledger(crash_after_reading)
    store.transition("j", JobState.RELEASED)
    """
)


def test_a_crash_between_the_state_change_and_its_charge_loses_neither(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    store = Store(tmp_path / "state.db")
    store.keep_ledger(release_charges(releases))
    store.add_job(_job("j", ["books"]))
    _manifest(releases, "j", _gates({"books": 1.25}))
    _run(store, "j", S.CHECKING)
    store.close()

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path / "state.db"), str(releases)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 9, done.stderr.decode()

    store = Store(tmp_path / "state.db")
    store.keep_ledger(release_charges(releases))
    assert store.job("j").state is S.CHECKING  # the change went with the transaction
    assert epsilon_spent(store, ["books"]) == {"books": 0.0}
    store.transition("j", S.RELEASED)  # released again: charged, once
    assert epsilon_spent(store, ["books"]) == {"books": 1.25}
    store.close()


def _federated(per_site: dict[str, tuple[list[str], Any]]) -> dict[str, Any]:
    """A federated release's manifest: each site's datasets and the ε it countersigned."""
    return {
        "schema": FEDERATED,
        "sites": [
            {"site": s, "datasets": dict.fromkeys(ds, 1), "epsilon": eps}
            for s, (ds, eps) in per_site.items()
        ],
    }


def test_a_federated_release_charges_each_dataset_its_sites_epsilon_once(
    ledger: tuple[Store, Path],
) -> None:
    """Each dataset is charged, once per job, the ε its own site composed over the rounds it
    trained; a site with no DP it set charges nothing; a figure that is not a finite number
    >= 0 charges everything (fail closed), and only that site's datasets."""
    store, releases = ledger
    names = ["books-a", "books-b", "books-c", "notes"]
    store.add_job(_job("fed", names))
    _manifest(
        releases,
        "fed",
        _federated(
            {
                "site-a": (["books-a", "notes"], 2.25),
                "site-b": (["books-b"], None),
                "site-c": (["books-c"], float("nan")),
            }
        ),
    )
    _run(store, "fed", S.RELEASED)
    spent = epsilon_spent(store, names)
    assert spent["books-a"] == spent["notes"] == 2.25
    assert spent["books-b"] == 0.0
    assert spent["books-c"] == WORST
