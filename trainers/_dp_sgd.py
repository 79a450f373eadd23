"""DP-SGD wiring for the built-in trainers: Opacus' per-sample gradients, optimizer and accountant.

:class:`PrivateTraining` attaches Opacus to a run: per-sample gradients on the network, the
DP optimizer that clips each to ``dp_max_grad_norm`` and adds Gaussian noise, and the RDP
accountant. Inside a site the noise multiplier and sample rate are the site's
(:class:`~trainers.contract.DPParameters`), used exactly as given; only a run outside a site
calibrates its own (:func:`trainers.privacy.calibrate`). The sampling and the noise are seeded
from a random key the OS draws for the job (:func:`derive_seed`), kept in the checkpoint and
never derived from ``seed``, which the model team knows. See :mod:`trainers.training`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainers import privacy
from trainers.contract import DPParameters
from trainers.errors import ConfigError
from trainers.hparams import PREFIX, DPSettings

KEY_BYTES = 32
_LOOSE_ORDER = privacy.LOOSE_ORDER
RDP_ORDERS = privacy.RDP_ORDERS


def derive_seed(key: bytes, purpose: bytes, step: int) -> int:
    """A 63-bit seed for ``purpose`` at ``step``, from the job's secret key."""
    digest = hashlib.sha256(key + purpose + step.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class PrivateTraining:
    """Opacus pieces for one run: per-sample gradients on ``net``, the DP optimizer made in
    :meth:`wrap`, the RDP accountant, and the job's secret key."""

    settings: DPSettings
    sample_rate: float
    noise_multiplier: float
    expected_batch_size: int
    key: bytes
    grad_module: Any
    accountant: Any
    optimizer: Any = None

    @classmethod
    def attach(
        cls,
        net: torch.nn.Module,
        settings: DPSettings,
        *,
        rows: int,
        batch_size: int,
        steps: int,
        site: DPParameters | None = None,
    ) -> PrivateTraining:
        """DP-SGD on ``net`` with the ``site``'s parameters, used as given; without them (a
        run outside a site) calibrated here for ``batch_size`` of ``rows`` samples. Raises
        :class:`ConfigError` when the site's parameters are not the ones the hyperparameters
        ask for (steps, clipping, δ), or the target cannot be reached."""
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant

        if site is None:
            site = privacy.calibrate(settings, sample_rate=min(1.0, batch_size / rows), steps=steps)
        elif (site.steps, site.max_grad_norm, site.delta) != (
            steps,
            settings.max_grad_norm,
            settings.delta,
        ):
            raise ConfigError(
                f"{PREFIX}.dp_epsilon",
                "the site's DP-SGD parameters do not match the hyperparameters",
            )
        return cls(
            settings=settings,
            sample_rate=site.sample_rate,
            noise_multiplier=site.noise_multiplier,
            expected_batch_size=max(1, round(site.sample_rate * rows)),
            key=os.urandom(KEY_BYTES),
            # Hooks on net's layers record per-sample gradients; net itself is unchanged.
            grad_module=GradSampleModule(net, loss_reduction="mean"),
            accountant=RDPAccountant(),
        )

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=torch.Generator(),
        )
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        return self.optimizer  # type: ignore[no-any-return]

    def seed_noise(self, step: int) -> None:
        if self.optimizer is not None:
            self.optimizer.generator.manual_seed(derive_seed(self.key, b"noise", step))

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOOSE_ORDER)
            return float(self.accountant.get_epsilon(delta=self.settings.delta, alphas=RDP_ORDERS))

    def state(self) -> dict[str, Any]:
        return {"key": self.key, "history": [list(h) for h in self.accountant.history]}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.key = bytes(state["key"])
        self.accountant.history = [tuple(h) for h in state["history"]]
