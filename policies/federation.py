"""The round plan of a federated job: one model fine-tuned across the sites holding the job's
datasets, ``rounds`` times ``local_steps`` of a built-in trainer at each site from the current
global model, each site's update gated at home and summed securely (``enclave.secagg``).

A spec asks for it with a ``federation:`` block. The plan is part of the spec, so the spec's
digest, and with it every owner's approval, covers the whole plan: a gateway that ran more
rounds, fewer sites, or another rule would be running a job nobody approved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FEDERATED_TRAINERS = ("causal-lm", "causal-lm-lora", "classification")
"""Built-in trainers only: the site must know what an update is to gate it (a LoRA adapter, or
a whole model's difference from the base: ``trainers.rounds``)."""

MAX_ROUNDS = 1000


class FederationModel(BaseModel):
    """The ``federation:`` block as written (the spec's edge validates it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rounds: int = Field(ge=1, le=MAX_ROUNDS)
    local_steps: int = Field(ge=1, le=100_000)
    aggregation: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float | None = Field(default=None, gt=0, le=100)
    weight_by: Literal["examples", "tokens"] = "examples"
    min_sites: int = Field(default=2, ge=2, le=255)
    update_clip: float = Field(default=1.0, gt=0, le=1024)

    @model_validator(mode="after")
    def _proximal(self) -> FederationModel:
        if self.aggregation == "fedprox" and self.proximal_mu is None:
            raise ValueError("proximal_mu: required with aggregation 'fedprox'")
        if self.aggregation == "fedavg" and self.proximal_mu is not None:
            raise ValueError("proximal_mu: only with aggregation 'fedprox'")
        return self


@dataclass(frozen=True)
class FederationPlan:
    """A validated round plan.

    Each round, every site taking part trains ``local_steps`` steps from the global model
    (FedProx adds ``proximal_mu / 2 · ||w - w_global||^2`` to its loss), clips each number of its
    update to ±``update_clip``, and the rounds' updates are averaged weighted by the examples
    (or tokens) each site trained on. A round needs ``min_sites`` sites in its sum, or it is
    retried, then the job fails.
    """

    rounds: int
    local_steps: int
    aggregation: str = "fedavg"
    proximal_mu: float | None = None
    weight_by: str = "examples"
    min_sites: int = 2
    update_clip: float = 1.0

    @classmethod
    def from_model(cls, model: FederationModel) -> FederationPlan:
        return cls(**model.model_dump())

    @property
    def total_steps(self) -> int:
        """Local steps a site takes over the whole job, if it is in every round."""
        return self.rounds * self.local_steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "local_steps": self.local_steps,
            "aggregation": self.aggregation,
            "proximal_mu": self.proximal_mu,
            "weight_by": self.weight_by,
            "min_sites": self.min_sites,
            "update_clip": self.update_clip,
        }
