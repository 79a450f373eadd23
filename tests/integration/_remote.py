"""Real processes for remote-site tests: ``sealroom`` verbs as subprocesses, each with its own
``--home``, started, stopped with SIGTERM or killed by PID; a site's home as its operator hands
it over."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from enclave.models import ModelStore
from gateway.client import Client
from gateway.identity import CertificateAuthority
from policies.identity import Role
from trainers.basemodel import create_base_model
from trainers.synthetic import corpus


def sealroom(home: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from gateway.cli import main; main()",
        "--home",
        str(home),
        *args,
    ]


class Serving:
    """A serving verb (``--json``) started as its own process; ``doc`` is the first JSON
    document it printed (once it serves)."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self._err = log.open("a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True)
        assert self.proc.stdout is not None
        text = ""
        while not text.endswith("}\n"):
            line = self.proc.stdout.readline()
            if not line:
                self.kill()
                raise AssertionError(self.tail())
            text += line
        self.doc: dict[str, object] = json.loads(text)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def kill(self) -> None:
        """SIGKILL, by PID: nothing of its own shutdown runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._close()

    def stop(self) -> None:
        """SIGTERM; it must exit cleanly."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._close()
        assert code == 0, self.tail()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@contextlib.contextmanager
def serving(cmd: list[str], log: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """Start a serving verb; yield it and its first JSON document; SIGTERM it on the way out
    (it must exit cleanly), SIGKILL it if anything failed."""
    s = Serving(cmd, log)
    try:
        yield s.proc, s.doc
        s.stop()
    finally:
        if s.proc.poll() is None:
            s.kill()


def site_home(root: Path, ca: CertificateAuthority, name: str) -> Path:
    """The site's own home, as the operator hands it over: the CA certificate (not its key)
    and the site's two identities; a base model registered at the site."""
    home = root / f"{name}-home"
    (home / "ca").mkdir(parents=True)
    shutil.copy(ca.cert_path, home / "ca" / "ca.pem")
    ids = home / "identities"
    ca.issue(name, role=Role.SITE, out_dir=ids)
    ca.site_signer(name, out_dir=ids)
    model = create_base_model(root / "tiny-lm", texts=corpus(documents=20, seed=1000), seed=0)
    ModelStore(home / "site" / "models").register("tiny-lm", model)
    return home


def wait_for_dataset(owner: Client, name: str) -> None:
    deadline = time.monotonic() + 60
    while not any(d.name == name for d in owner.datasets()):
        assert time.monotonic() < deadline, f"the site never told the gateway of {name}"
        time.sleep(0.2)
