"""`sealroom demo` (what `make demo` runs) plays the whole story and says what held.

Run as a person runs it, through the installed command, on a throw-away deployment: every step
must hold and the JSON summary must name the release's artifacts and the verified audit log.
How long it took is reported (the README's figure), never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_the_demo_plays_the_whole_story(tmp_path: Path, runtime_image: str) -> None:
    exe = shutil.which("sealroom", path=os.path.dirname(sys.executable))
    assert exe, "the sealroom command is not installed beside this interpreter"
    proc = subprocess.run(
        [exe, "demo", "--json", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["release"]["artifacts"] == ["metrics.json", "weights/model.safetensors"]
    assert summary["audit"]["records"] > 0 and summary["audit"]["files_read"] > 0
    print(f"demo took {summary['seconds']} s")


def test_the_federated_demo_runs_a_job_at_each_site(tmp_path: Path, runtime_image: str) -> None:
    """``sealroom demo --sites 2``: two owners keep their data at two sites; each site runs
    the job on its data and signs its release; one audit log tells both."""
    exe = shutil.which("sealroom", path=os.path.dirname(sys.executable))
    assert exe, "the sealroom command is not installed beside this interpreter"
    proc = subprocess.run(
        [exe, "demo", "--sites", "2", "--json", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert {s: v["state"] for s, v in summary["sites"].items()} == {
        "library": "RELEASED",
        "hospital": "RELEASED",
    }
    assert summary["audit"]["container_starts"] == {"library": 1, "hospital": 1}
    assert all(n >= 1 for n in summary["audit"]["site_checkpoints"].values())
    print(f"federated demo took {summary['seconds']} s")
