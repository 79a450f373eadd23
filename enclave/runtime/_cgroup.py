"""Killing a container from the host, through its cgroup: the last step before forced removal.

A container the engine cannot kill (it answers "did not receive an exit event" for a job holding
its process limit) has every process of its cgroup SIGKILLed from the host: one write to
``cgroup.kill`` on cgroup v2, else frozen first (so a fork bomb adds none) and killed one by one.
Only a cgroup whose path names the container is ever touched. :func:`pids_refused` reads how
many forks the kernel refused the job (the note on a fork bomb's timeout). All best effort.
"""

from __future__ import annotations

import os
import re
import signal
import time

CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}$")
CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_dirs(pid: int, container_id: str) -> list[str]:
    """The cgroup directories of host process ``pid`` (the v2 one, or the v1 freezer and pids
    ones), kept only where the path names ``container_id``: this never touches a cgroup that is
    not the container's own (the host's root, the agent's)."""
    if pid <= 0 or not CONTAINER_ID_RE.match(container_id):
        return []
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or container_id not in parts[2] or ".." in parts[2].split("/"):
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":
            out.append(f"{CGROUP_ROOT}{path}")
        elif "freezer" in names:
            out.insert(0, f"{CGROUP_ROOT}/freezer{path}")  # freeze first: no new forks
        elif "pids" in names:
            out.append(f"{CGROUP_ROOT}/pids{path}")
    return [d for d in out if os.path.isdir(d)]


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
    except OSError:
        return False
    return True


def kill_cgroup(pid: int, container_id: str) -> None:
    """SIGKILL every process of the container's cgroup, from the host (best effort).

    cgroup v2 with ``cgroup.kill`` does it in one write. Otherwise the cgroup is frozen (v2
    ``cgroup.freeze`` or the v1 freezer) so that a fork bomb cannot add processes while they
    are killed one by one from ``cgroup.procs``, and thawed after, when the kills land."""
    dirs = cgroup_dirs(pid, container_id)
    for d in dirs:
        if _write(f"{d}/cgroup.kill", "1"):
            return
    frozen = []
    for d in dirs:
        if _write(f"{d}/cgroup.freeze", "1") or _write(f"{d}/freezer.state", "FROZEN"):
            frozen.append(d)
    await_frozen(frozen)
    for _ in range(50):  # a frozen cgroup forks no more; unfrozen, each pass finds fewer
        killed = 0
        for d in dirs:
            try:
                with open(f"{d}/cgroup.procs", encoding="ascii") as f:
                    pids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
        if not killed or frozen:
            break
    for d in frozen:
        if not _write(f"{d}/cgroup.freeze", "0"):
            _write(f"{d}/freezer.state", "THAWED")


def await_frozen(dirs: list[str], *, within_s: float = 2.0) -> None:
    """Wait (briefly) until the freezer says FROZEN (v1) or ``frozen 1`` (v2 cgroup.events)."""
    end = time.monotonic() + within_s
    for d in dirs:
        while time.monotonic() < end:
            try:
                with open(f"{d}/freezer.state", encoding="ascii") as f:
                    if f.read().strip() == "FROZEN":
                        break
            except FileNotFoundError:
                try:
                    with open(f"{d}/cgroup.events", encoding="ascii") as f:
                        if "frozen 1" in f.read():
                            break
                except OSError:
                    break
            except OSError:
                break
            time.sleep(0.01)


def pids_refused(pid: int) -> int | None:
    """How many forks the PIDs cgroup of host process ``pid`` has refused (``pids.events``
    ``max``), or None where that cannot be read (cgroup v1 or v2)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "pids" in controllers.split(","):
            v1 = f"/sys/fs/cgroup/pids{path}/pids.events"
        elif controllers == "":
            v2 = f"/sys/fs/cgroup{path}/pids.events"
    for events in (v1, v2):
        if events is None:
            continue
        try:
            with open(events, encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None
