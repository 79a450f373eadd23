"""Who is calling: the four roles and the principal taken from a client certificate.

The gateway builds a :class:`Principal` from the verified TLS client certificate only (subject
CN = name, OU = role, O = team); nothing a client types can change it. Sites hold certificates
with the role ``site``: a site may serve the gateway and sign releases, never call user RPCs.
``unauthenticated`` names, in the audit log only, a caller that presented no certificate with a
valid role; the gateway refuses a certificate that claims it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    MODEL_TEAM = "model-team"
    DATA_OWNER = "data-owner"
    COMPLIANCE = "compliance"
    OPERATOR = "operator"
    SITE = "site"
    # Only the audit record of a caller without a valid certificate: never granted by one.
    UNAUTHENTICATED = "unauthenticated"


USER_ROLES: frozenset[Role] = frozenset(
    {Role.MODEL_TEAM, Role.DATA_OWNER, Role.COMPLIANCE, Role.OPERATOR}
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``team`` groups model-team principals for policies."""

    name: str
    role: Role
    team: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"
