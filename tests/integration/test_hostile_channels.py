"""A hostile job uses every channel the model team can observe at once, and a decoder on the
team's side reads it back: what it recovers never exceeds the job's leakage account, and the
account never exceeds the policy's budget.

The secret is random bytes in a dataset. The job encodes consecutive bits of it into the
progress it writes (a coarse symbol and finer digits in each loss, odd steps and totals), the
metrics it releases, and how it ends (which check refuses it, its exit code). The decoder knows
the encoding and tries every symbol, the fine ones included; a segment counts as recovered only
when every bit of it is right. On the code before the account (full-precision losses every
second, "exited with code N", the refusal's every reason) the same decoder recovered the fine
digits and the exit code too.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._deployment import Deployment, bundle, deploy, policy

pytestmark = pytest.mark.docker

SECRET_BYTES = 48
BUDGET_BITS = 512

SPEC = """\
name: {name}
datasets: [secrets]
base_model: tiny-lm
trainer: custom
entrypoint: "attack:Module"
purpose: testing
resources: {{cpus: 1, memory_mb: 1024, timeout_s: 120}}
env: {{JOB_MODE: "{mode}"}}
"""

# Module-level code: runs when the harness imports the entrypoint, then exits by itself.
ENCODER = """
import glob, json, os, pickle, shutil, sys, time
secret = open(glob.glob("/data/secrets/*.txt")[0]).read().strip()
bits = "".join(f"{b:08b}" for b in bytes.fromhex(secret))
pos = 0
def take(n):
    global pos
    value = int(bits[pos:pos + n], 2)
    pos += n
    return value
def weights(extra=False):
    from safetensors.torch import load_file, save_file
    import torch
    tensors = load_file("/model/base/model.safetensors")
    if extra:
        tensors["smuggled"] = torch.arange(take(8), dtype=torch.float32)
    os.makedirs("/output/weights", exist_ok=True)
    save_file(tensors, "/output/weights/model.safetensors")
mode = os.environ["JOB_MODE"]
if mode == "release":
    # Ten points at the site's schedule (10, 20, ... of 100 steps), each loss carrying a
    # coarse 6-bit symbol and 10 more bits in its finer digits; the totals lie.
    with open("/output/metrics.jsonl", "a") as f:
        for j in range(1, 11):
            coarse, fine = take(6), take(10)
            loss = 1.0 + coarse / 10 + (fine + 1) / 1e5
            f.write(json.dumps({"step": 10 * j, "total": 7 + take(4), "loss": loss}) + "\\n")
            f.flush()
            time.sleep(2.5)  # the site reads about once a second: one line a reading
    metrics = {name: 1 + take(13) / 1000 for name in ("train_loss", "eval_loss", "perplexity")}
    with open("/output/metrics.json", "w") as f:
        json.dump(metrics, f)
    weights()
    sys.exit(0)
# mode == "outcome": two bits pick how the job ends, the exit code carries seven more.
how = take(2)
if how == 0:
    sys.exit(1 + take(7))
if how == 1:
    weights()
    with open("/output/model.pt", "wb") as f:
        pickle.dump({"n": take(7)}, f)
elif how == 2:
    weights()
    with open("/output/metrics.json", "w") as f:
        json.dump({"train_loss": "x" * (1 + take(7))}, f)
else:
    weights(extra=True)
sys.exit(0)
"""

OUTCOME_BY_REASON = {
    "failed: non-zero exit": 0,
    "rejected: release artifacts": 1,
    "rejected: metrics": 2,
    "rejected: weights structure": 3,
}


def bits_of(secret: bytes) -> str:
    return "".join(f"{b:08b}" for b in secret)


class Recovered:
    """The decoder's tally: a segment of the secret's bits counts when it is wholly right."""

    def __init__(self, secret_bits: str) -> None:
        self.secret = secret_bits
        self.pos = 0
        self.bits = 0

    def skip(self, n: int) -> None:
        self.pos += n

    def claim(self, n: int, value: int | None) -> None:
        truth = int(self.secret[self.pos : self.pos + n], 2)
        if value is not None and value == truth:
            self.bits += n
        self.pos += n


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory, runtime_image: str) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("channels")
    d = deploy(root)
    data = root / "secrets"
    data.mkdir()
    secret = os.urandom(SECRET_BYTES)
    (data / "secret.txt").write_text(secret.hex())
    d.secret = secret  # type: ignore[attr-defined]
    with d.client("olivia") as owner:
        owner.register_dataset("secrets", data, description="random bytes a job tries to leak")
        owner.put_policy("secrets", policy("secrets", custom_code=True, memorization=False))
    try:
        yield d
    finally:
        d.stop()


def run(dep: Deployment, tmp_path: Path, mode: str) -> tuple[object, list[object]]:
    """Submit, approve (and pass the owner's review if the policy holds the release), and
    return the team's view of the job and every event the team's watch showed."""
    code = bundle(tmp_path / f"{mode}.tar.gz", {"attack.py": ENCODER})
    with dep.client("theo") as team, dep.client("olivia") as owner:
        job = team.submit(SPEC.format(name=f"leak-{mode}", mode=mode), bundle=code)
        owner.decide(job.id, approve=True, reason="test")
        events = []
        for event in team.watch(job.id, timeout=600):
            events.append(event)
            if event.state == "AWAITING_REVIEW":  # reviewed custom code: the owner approves
                owner.decide_release(job.id, approve=True, reason="test")
        return team.job(job.id), events


def assert_within_account(job: object, recovered: Recovered) -> None:
    bits = job.channel_bits  # type: ignore[attr-defined]
    assert 0 < recovered.bits <= bits <= BUDGET_BITS, (recovered.bits, bits)


def test_progress_and_metrics_carry_no_more_than_the_account(
    dep: Deployment, tmp_path: Path
) -> None:
    job, events = run(dep, tmp_path, "release")
    assert job.state == "RELEASED", (job.state, list(job.reasons))
    got = Recovered(bits_of(dep.secret))  # type: ignore[attr-defined]
    # A progress point is (step, total, loss).
    points = {e.progress[0]: e for e in events if e.progress is not None}
    for j in range(1, 11):
        event = points.get(10 * j)
        loss = event.progress[2] if event is not None else None
        coarse = None if loss is None else round((loss - 1.0) * 10)
        got.claim(6, coarse)
        # The fine digits: recoverable only where the site lets more than 2 digits through.
        fine = None if loss is None else round((loss - 1.0 - (coarse or 0) / 10) * 1e5) - 1
        got.claim(10, fine)
        total = None if event is None else event.progress[1] - 7
        got.claim(4, total)
    for name in ("train_loss", "eval_loss", "perplexity"):
        value = job.metrics.get(name)
        got.claim(13, None if value is None else round((value - 1) * 1000))
    # What the team saw is the site's schedule and two-digit losses only.
    assert sorted(points) == [10 * j for j in range(1, 11)]
    for e in points.values():
        _, total, loss = e.progress
        assert total == 100
        assert float(f"{loss:.2g}") == loss
    # Times come on the job's grid (1 s here): nothing finer than the account counts.
    for stamp in [job.updated_at, *(e.time for e in events)]:
        assert dt.datetime.fromisoformat(stamp).microsecond == 0, stamp
    assert got.bits == 10 * 6 + 3 * 13  # the coarse symbols and the metrics, nothing finer
    assert_within_account(job, got)


def test_how_a_job_ends_carries_no_more_than_the_account(dep: Deployment, tmp_path: Path) -> None:
    job, _ = run(dep, tmp_path, "outcome")
    got = Recovered(bits_of(dep.secret))  # type: ignore[attr-defined]
    reasons = list(job.reasons)
    assert len(reasons) == 1 and not any(ch.isdigit() for ch in reasons[0]), reasons
    how = OUTCOME_BY_REASON.get(reasons[0])
    got.claim(2, how)
    # The seven bits behind each ending (exit code, a pickled number, a string's length, a
    # tensor's size) would show only in a reason that carried numbers.
    digits = "".join(ch for ch in " ".join(reasons) if ch.isdigit())
    got.claim(7, int(digits) - 1 if digits else None)
    assert got.bits == 2
    assert not job.details  # the team never gets the owners' view
    assert_within_account(job, got)
    with dep.client("olivia") as owner:
        seen = owner.job(job.id)
    assert seen.details, "the owners see what the site said"
