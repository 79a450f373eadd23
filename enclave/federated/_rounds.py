"""The site's own record of the federated jobs it takes part in: which rounds it trained, which
it sent a masked update for, and the privacy loss that adds up to.

Three rules hold whatever the gateway asks, since it is the site that keeps the record:

- **A round is trained once.** Asked again for a round it trained (a retry after too few sites
  answered), the site sends the update it kept, which costs no privacy: it is the same output of
  the same DP-SGD run, not a new look at the data.
- **No more local trainings than the plan's rounds, and none past the per-job ε.** The DP-SGD
  noise is calibrated for the whole plan, so an honest job ends exactly at its ε; a gateway that
  asks for more rounds is refused before any data is decrypted.
- **An update is masked into one sum at most.** Two sums that differ by one site would give that
  site's update by subtraction; so a site that sent a masked update for a round sends none for it
  again, even on a retry (it sits that retry out).

The record is a JSON object rewritten atomically under an exclusive ``flock``, as the policy
record is (:class:`enclave.sovereignty.PolicyBook`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from enclave.secretfile import write_secret
from policies.errors import PolicyViolation, SiteError
from trainers import privacy
from trainers.contract import DPParameters


@dataclass(frozen=True)
class JobRounds:
    """One federated job at this site."""

    local_steps: int
    planned_rounds: int
    dp: DPParameters | None
    trained: tuple[int, ...] = ()
    masked: tuple[int, ...] = ()

    def epsilon(self, *, delta: float, rounds: int | None = None) -> float:
        """ε of the local trainings so far (or of ``rounds`` of them), composed by the RDP
        accountant as one run of their steps; +inf without DP the site set."""
        if self.dp is None:
            return math.inf
        count = len(self.trained) if rounds is None else rounds
        if count == 0:
            return 0.0
        return privacy.epsilon(replace(self.dp, steps=count * self.local_steps), delta=delta)

    def to_obj(self) -> dict[str, Any]:
        return {
            "local_steps": self.local_steps,
            "planned_rounds": self.planned_rounds,
            "dp": None if self.dp is None else self.dp.to_obj(),
            "trained": list(self.trained),
            "masked": list(self.masked),
        }

    @classmethod
    def from_obj(cls, raw: Any) -> JobRounds:
        return cls(
            local_steps=int(raw["local_steps"]),
            planned_rounds=int(raw["planned_rounds"]),
            dp=None if raw["dp"] is None else DPParameters.from_obj(raw["dp"]),
            trained=tuple(int(r) for r in raw["trained"]),
            masked=tuple(int(r) for r in raw["masked"]),
        )


class RoundBook:
    """The site's round record (``keys/federated-rounds.json`` under the site's root)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of_site(cls, root: Path) -> RoundBook:
        return cls(root / "keys" / "federated-rounds.json")

    def held(self) -> dict[str, JobRounds]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SiteError(f"the site's round record {self.path.name} cannot be read") from e
        try:
            return {str(job): JobRounds.from_obj(v) for job, v in raw.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise SiteError(f"the site's round record {self.path.name} is malformed") from e

    def job(self, job_id: str) -> JobRounds | None:
        return self.held().get(job_id)

    def train(
        self,
        job_id: str,
        round_no: int,
        *,
        local_steps: int,
        planned_rounds: int,
        dp: DPParameters | None,
        max_epsilon: float,
        delta: float,
    ) -> bool:
        """Record that this site trains ``round_no`` of ``job_id`` with ``dp`` (one round's
        DP-SGD: ``steps`` is ``local_steps``), before it decrypts any data;
        False when it trained that round already (send the kept update). Raises
        :class:`PolicyViolation`, recording nothing, for a round past the plan or past
        ``max_epsilon`` at ``delta``, or settings that differ from the job's first round."""
        with self._locked() as held:
            rec = held.get(job_id) or JobRounds(local_steps, planned_rounds, dp)
            if (rec.local_steps, rec.planned_rounds, rec.dp) != (local_steps, planned_rounds, dp):
                raise PolicyViolation(
                    f"job {job_id}: round {round_no} asks for other steps, rounds or DP than "
                    "the job's first round at this site"
                )
            if round_no in rec.trained:
                return False
            if not 0 <= round_no < planned_rounds or len(rec.trained) >= planned_rounds:
                raise PolicyViolation(
                    f"job {job_id}: round {round_no} is beyond the {planned_rounds} rounds "
                    "the owners approved"
                )
            after = rec.epsilon(delta=delta, rounds=len(rec.trained) + 1)
            if after > max_epsilon:
                raise PolicyViolation(
                    f"job {job_id}: round {round_no} would bring this site's epsilon to "
                    f"{after:.4g}, over the per-job cap {max_epsilon:.4g}"
                )
            held[job_id] = replace(rec, trained=(*rec.trained, round_no))
            self._write(held)
            return True

    def mask(self, job_id: str, round_no: int) -> None:
        """Record that this site sends its masked update for ``round_no``; raises
        :class:`PolicyViolation`, recording nothing, when it has for that round already or did
        not train it."""
        with self._locked() as held:
            rec = held.get(job_id)
            if rec is None or round_no not in rec.trained:
                raise PolicyViolation(f"job {job_id}: round {round_no} was not trained here")
            if round_no in rec.masked:
                raise PolicyViolation(
                    f"job {job_id}: this site's update for round {round_no} went into a sum "
                    "already; it goes into no second one"
                )
            held[job_id] = replace(rec, masked=(*rec.masked, round_no))
            self._write(held)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, JobRounds]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.held()

    def _write(self, held: dict[str, JobRounds]) -> None:
        body = {job: rec.to_obj() for job, rec in sorted(held.items())}
        write_secret(self.path, json.dumps(body, sort_keys=True).encode())
