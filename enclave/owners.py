"""Which data owner each dataset of a remote site belongs to, as the site's operator registered
it (``sealroom site dataset register NAME DIR --owner OWNER``), and what the gateway learns of
those datasets: their versions' metadata (:class:`enclave.link.PushedDataset`), never bytes.

``<site>/owners.json`` maps a dataset to its owner and description, written whole and renamed
into place. A dataset keeps its first owner: registering a version for another is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from enclave.contract import StoredDataset
from enclave.link import PushedDataset
from enclave.vault import Vault
from policies.errors import PermissionDenied, PolicyViolation

OWNERS = "owners.json"


class SiteDatasets:
    """The datasets in ``vault`` with their owners, kept in ``root/owners.json``."""

    def __init__(self, root: Path, vault: Vault) -> None:
        self.path = root / OWNERS
        self.vault = vault

    def owners(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text())
        return {
            str(k): {"owner": str(v["owner"]), "description": str(v.get("description", ""))}
            for k, v in raw.items()
        }

    def owner(self, name: str) -> str:
        """The owner on record (the site's, not the gateway's word): a site run checks
        signatures against it. Raises :class:`PolicyViolation` for a dataset without one."""
        known = self.owners().get(name)
        if known is None:
            raise PolicyViolation(f"dataset {name} has no owner on record at this site")
        return known["owner"]

    def check_owner(self, name: str, owner: str) -> None:
        """Raises :class:`PermissionDenied` when ``name`` belongs to another owner."""
        known = self.owners().get(name)
        if known is not None and known["owner"] != owner:
            raise PermissionDenied(f"dataset {name} belongs to {known['owner']}")

    def record(self, name: str, owner: str, description: str) -> None:
        self.check_owner(name, owner)
        owners = self.owners()
        owners[name] = {"owner": owner, "description": description}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(owners, sort_keys=True, indent=1))
        os.replace(tmp, self.path)

    def pushed(self) -> list[PushedDataset]:
        """Every version of every dataset with an owner on record, oldest first."""
        out = []
        for name, info in sorted(self.owners().items()):
            for v in self.vault.versions(name):
                stored = StoredDataset(
                    name=v.name,
                    version=v.version,
                    root_hash=v.root_hash,
                    size=v.total_bytes,
                    files=tuple((e.path, e.size, e.sha256) for e in v.files),
                )
                out.append(PushedDataset(stored, info["owner"], info["description"]))
        return out


class OwnerRecord:
    """The owners lookup a site agent is opened with (``SiteAgent.open(owners=...)``), before
    its vault, and so its :class:`SiteDatasets`, exists: set ``datasets`` once it does. Until
    then it knows no owner (None)."""

    datasets: SiteDatasets | None = None

    def owner(self, dataset: str) -> str | None:
        return None if self.datasets is None else self.datasets.owner(dataset)
