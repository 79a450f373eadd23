"""The gateway's catalogue of datasets and their policies, as their owners write it: a dataset
archive goes to the site's vault and the version it became is recorded; a policy document is
parsed, checked against its dataset and stored as that dataset's next version, after which every
job it touches that has not started is decided again. Only a dataset's owner writes either.
"""

from __future__ import annotations

from collections.abc import Callable

from enclave.contract import Site
from gateway._facade import Facade
from gateway._spool import SealedSpool
from gateway.store import DatasetFileRecord, DatasetRecord, PolicyRecord, Store, utcnow
from policies import document
from policies.errors import InvalidInput, NotFound, PermissionDenied
from policies.identity import Principal
from policies.spec import NAME_RE


class Catalog:
    """Datasets and policies over ``store`` and ``site``; ``reevaluate`` is told each dataset
    whose policy changed."""

    def __init__(
        self, facade: Facade, *, store: Store, site: Site, reevaluate: Callable[[str], None]
    ) -> None:
        self._g = facade
        self.store = store
        self.site = site
        self._reevaluate = reevaluate

    def register_dataset(
        self,
        *,
        principal: Principal,
        name: str,
        description: str,
        archive: SealedSpool,
        archive_sha256: str,
    ) -> DatasetRecord:
        """See :meth:`gateway.core.Gateway.register_dataset`."""
        if not NAME_RE.match(name):
            raise InvalidInput(f"dataset name {name!r}: use lowercase letters, digits, . _ -")
        owner = self.store.dataset_owner(name)
        if owner is not None and owner != principal.name:
            raise PermissionDenied(f"dataset {name} belongs to {owner}")
        actual = archive.seal()
        if archive_sha256 and actual != archive_sha256:
            raise InvalidInput(
                f"dataset archive hash mismatch: header says {archive_sha256}, got {actual}"
            )
        with archive.reader() as stream:
            stored = self.site.store_dataset(name, archive=stream)
        try:
            existing = self.store.dataset(name, stored.version)
        except NotFound:
            existing = None
        if existing is not None:  # the vault found identical content: same version
            return existing
        record = self.store.add_dataset(
            DatasetRecord(
                name=name,
                version=stored.version,
                owner=principal.name,
                root_hash=stored.root_hash,
                size=stored.size,
                files=tuple(DatasetFileRecord(p, s, h) for p, s, h in stored.files),
                description=description,
                created_at=utcnow(),
            )
        )
        self._g.record(
            principal,
            "dataset.register",
            dataset=f"{name}@v{record.version}",
            details={
                "root_hash": record.root_hash,
                "files": len(record.files),
                "size": record.size,
            },
        )
        return record

    def put_policy(self, *, principal: Principal, dataset: str, text: str) -> PolicyRecord:
        """See :meth:`gateway.core.Gateway.put_policy`."""
        owner = self.store.dataset_owner(dataset)
        if owner is None:
            raise NotFound(f"no dataset {dataset}: register it before writing its policy")
        if owner != principal.name:
            raise PermissionDenied(f"dataset {dataset} belongs to {owner}")
        doc = document.parse_policy(text)
        if doc.dataset != dataset:
            raise InvalidInput(f"policy names dataset {doc.dataset!r}, not {dataset!r}")
        record = self.store.add_policy(
            dataset=dataset,
            document=text,
            sha256=doc.digest(),
            author=principal.name,
        )
        self._g.record(
            principal,
            "policy.put",
            dataset=dataset,
            details={"version": record.version, "sha256": record.sha256},
        )
        self._reevaluate(dataset)
        return record
