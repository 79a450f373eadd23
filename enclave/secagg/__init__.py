"""Secure aggregation for federated rounds: the gateway learns the weighted mean of the sites'
updates and nothing of any one of them. :class:`SiteRound` is a site's part, :class:`Aggregator`
the gateway's, :class:`RoundConfig` the settings both check; ``docs/secure-aggregation.md`` says
why it is built this way and what it does not protect against.
"""

from enclave.secagg._aggregator import Aggregator
from enclave.secagg._round import RoundConfig
from enclave.secagg._site import Advert, Reveal, Sign, SiteRound, Verify
from enclave.secagg._vector import decode, encode, resolution

__all__ = [
    "Advert",
    "Aggregator",
    "Reveal",
    "RoundConfig",
    "Sign",
    "SiteRound",
    "Verify",
    "decode",
    "encode",
    "resolution",
]
