"""What the gateway's rooms ask of the façade (:class:`gateway.core.Gateway`): the catalogue,
the dispatcher and the release store change a job's state and write audit records only through
it, so every change is persisted, then audited, then published to watchers, one way, and a test
that wraps the façade's methods sees every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gateway.store import JobRecord
from policies.identity import Principal, Role
from policies.lifecycle import JobState

SYSTEM = Principal(name="gateway", role=Role.OPERATOR, team="")
"""The principal recorded for what the gateway does on its own (transitions, dispatch)."""


class Facade(Protocol):
    def record(
        self,
        principal: Principal,
        action: str,
        *,
        outcome: str = ...,
        job_id: str | None = ...,
        dataset: str | None = ...,
        file: str | None = ...,
        details: Mapping[str, Any] | None = ...,
    ) -> int:
        """Append one durable audit event; returns its sequence number."""
        ...

    def _transition(
        self, job_id: str, new: JobState, *, reason: str = ..., **changes: Any
    ) -> JobRecord:
        """Persist a state change, audit it, then tell the watchers."""
        ...
