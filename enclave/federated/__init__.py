"""A site's part in federated jobs: the record of the rounds it trained and masked
(:class:`RoundBook`), and a round's update as the vector secure aggregation sums."""

from enclave.federated._rounds import JobRounds, RoundBook
from enclave.federated._update import apply_mean, update_layout, update_length, update_vector

__all__ = [
    "JobRounds",
    "RoundBook",
    "apply_mean",
    "update_layout",
    "update_length",
    "update_vector",
]
