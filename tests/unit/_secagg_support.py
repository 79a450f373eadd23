"""Sites with real CA-issued identities, and an honest relay that drives one round of secure
aggregation among them, with dropouts at any step; shared by the secure aggregation tests."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enclave import signatures
from enclave.secagg import Advert, Aggregator, Reveal, RoundConfig, SiteRound
from gateway.identity import CertificateAuthority
from policies.identity import Role


@dataclass
class Identities:
    """Site identities of one deployment CA: signing and verifying as a site does."""

    ca: CertificateAuthority
    out: Path
    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (cert, key)

    def of(self, name: str, role: Role = Role.SITE) -> tuple[str, bytes]:
        if name not in self.keys:
            files = self.ca.issue(name, role=role, out_dir=self.out)
            self.keys[name] = (files.cert.read_text(), files.key.read_bytes())
        return self.keys[name]

    def verify(self, site: str, cert_pem: str, message: bytes, signature: str) -> None:
        signatures.verify(
            cert_pem=cert_pem,
            signature=signature,
            message=message,
            ca_cert_pem=self.ca.cert_pem,
            name=site,
            role=Role.SITE,
            what=f"secure aggregation: {site}'s statement",
        )

    def site_round(self, config: RoundConfig, name: str) -> SiteRound:
        cert, key = self.of(name)
        return SiteRound(
            config,
            site=name,
            cert_pem=cert,
            sign=lambda m: signatures.sign(key, m),
            verify=self.verify,
        )


@dataclass
class Transcript:
    """Everything the gateway saw and held in one round."""

    adverts: dict[str, Advert] = field(default_factory=dict)
    sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    confirmations: dict[str, str] = field(default_factory=dict)
    reveals: dict[str, Reveal] = field(default_factory=dict)


def run_round(
    ids: Identities,
    config: RoundConfig,
    updates: Mapping[str, np.ndarray],
    weights: Mapping[str, int],
    *,
    gone_before_advert: Collection[str] = (),
    gone_before_share: Collection[str] = (),
    gone_before_mask: Collection[str] = (),
    gone_before_reveal: Collection[str] = (),
) -> tuple[np.ndarray, int, Transcript, dict[str, SiteRound]]:
    """One round relayed honestly; a site named in ``gone_before_X`` stops answering there."""
    sites = {m: ids.site_round(config, m) for m in config.members if m not in gone_before_advert}
    agg, seen = Aggregator(config), Transcript()
    seen.adverts = agg.adverts({m: s.advertise() for m, s in sites.items()})
    live = [m for m in sites if m not in gone_before_share]
    seen.sealed = {m: sites[m].share(seen.adverts) for m in live}
    inbox = agg.route(seen.sealed)
    live = [m for m in live if m not in gone_before_mask]
    seen.masked = {m: sites[m].mask(inbox[m], updates[m], weights[m]) for m in live}
    seen.survivors = agg.survivors(seen.masked)
    live = [m for m in seen.survivors if m not in gone_before_reveal]
    seen.confirmations = {m: sites[m].confirm(seen.survivors) for m in live}
    seen.reveals = {m: sites[m].reveal(seen.survivors, seen.confirmations) for m in live}
    mean, weight = agg.unmask(seen.reveals)
    return mean, weight, seen, sites


def fedavg(
    updates: Mapping[str, np.ndarray], weights: Mapping[str, int], clip: float
) -> np.ndarray:
    """The plain weighted mean of the clipped updates, computed in the clear."""
    total = sum(weights.values())
    return sum(np.clip(updates[m], -clip, clip) * (weights[m] / total) for m in updates)  # type: ignore[return-value]
