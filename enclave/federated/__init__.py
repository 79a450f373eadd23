"""A site's part in federated jobs: the record of the rounds it trained and masked
(:class:`RoundBook`), a round's update as the vector secure aggregation sums, and the site's
side of each round's aggregation (:class:`Participant`)."""

from enclave.federated._participant import Participant, RoundSite
from enclave.federated._rounds import JobRounds, RoundBook
from enclave.federated._update import (
    LOSS_MAX,
    MAX_ROUND_WEIGHT,
    apply_mean,
    initial_adapter,
    initial_start,
    read_vector,
    round_vector,
    split_mean,
    update_layout,
    update_length,
    write_update,
)

__all__ = [
    "LOSS_MAX",
    "MAX_ROUND_WEIGHT",
    "JobRounds",
    "Participant",
    "RoundBook",
    "RoundSite",
    "apply_mean",
    "initial_adapter",
    "initial_start",
    "read_vector",
    "round_vector",
    "split_mean",
    "update_layout",
    "update_length",
    "write_update",
]
