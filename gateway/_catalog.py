"""The gateway's catalogue of datasets and their policies, as their owners write it: a dataset
archive goes to the site's vault and the version it became is recorded; a policy document is
parsed, checked against its dataset and stored as that dataset's next version, after which every
job it touches that has not started is decided again. Only a dataset's owner writes either.
"""

from __future__ import annotations

from collections.abc import Callable

from enclave.contract import Site, StoredDataset
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
        latest = self._latest(name)
        if latest is not None and latest.site:
            raise PermissionDenied(
                f"dataset {name} is kept at site {latest.site}: register its versions there"
            )
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

    def push_dataset(
        self,
        *,
        site: Principal,
        owner: str,
        stored: StoredDataset,
        description: str,
        is_owner: Callable[[str], bool],
    ) -> DatasetRecord:
        """A dataset version a remote site stored for ``owner`` (metadata only: the bytes
        stay at the site). The site must keep the dataset's earlier versions, the owner must be
        a data owner of this deployment (``is_owner``) and the dataset's owner, and the version
        must be the next one; the same version pushed again is acknowledged. Raises
        InvalidInput, PermissionDenied; records nothing then."""
        if not NAME_RE.match(stored.name):
            raise InvalidInput(
                f"dataset name {stored.name!r}: use lowercase letters, digits, . _ -"
            )
        if not is_owner(owner):
            raise InvalidInput(f"{owner!r} is not a data owner of this deployment")
        _check_metadata(stored)
        name = stored.name
        latest = self._latest(name)
        if latest is not None:
            if latest.owner != owner:
                raise PermissionDenied(f"dataset {name} belongs to {latest.owner}")
            if latest.site != site.name:
                where = latest.site or "the gateway's local site"
                raise PermissionDenied(f"dataset {name} is kept at {where}, not at {site.name}")
        try:
            existing = self.store.dataset(name, stored.version)
        except NotFound:
            existing = None
        if existing is not None:
            if existing.root_hash != stored.root_hash:
                raise InvalidInput(
                    f"dataset {name} v{stored.version} is recorded with another root hash"
                )
            return existing
        expected = (latest.version if latest is not None else 0) + 1
        if stored.version != expected:
            raise InvalidInput(
                f"dataset {name}: the next version is {expected}, not {stored.version}"
            )
        record = self.store.add_dataset(
            DatasetRecord(
                name=name,
                version=stored.version,
                owner=owner,
                root_hash=stored.root_hash,
                size=stored.size,
                files=tuple(DatasetFileRecord(p, s, h) for p, s, h in stored.files),
                description=description,
                created_at=utcnow(),
                site=site.name,
            )
        )
        self._g.record(
            site,
            "dataset.register",
            dataset=f"{name}@v{record.version}",
            details={
                "owner": owner,
                "site": site.name,
                "root_hash": record.root_hash,
                "files": len(record.files),
                "size": record.size,
            },
        )
        return record

    def _latest(self, name: str) -> DatasetRecord | None:
        try:
            return self.store.dataset(name)
        except NotFound:
            return None

    def put_policy(
        self,
        *,
        principal: Principal,
        dataset: str,
        text: str,
        version: int | None = None,
        signature: str = "",
        signer_cert: str = "",
    ) -> PolicyRecord:
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
            version=version,
            author=principal.name,
            signature=signature,
            signer_cert=signer_cert,
        )
        self._g.record(
            principal,
            "policy.put",
            dataset=dataset,
            details={"version": record.version, "sha256": record.sha256},
        )
        self._reevaluate(dataset)
        return record


def _check_metadata(stored: StoredDataset) -> None:
    """A pushed version's metadata must be well formed: hex SHA-256s, sizes that add up,
    relative paths, each once."""
    if not _is_sha256(stored.root_hash):
        raise InvalidInput("a dataset's root hash must be a hex SHA-256")
    if stored.version < 1 or not stored.files:
        raise InvalidInput("a dataset version is numbered from 1 and holds at least one file")
    seen: set[str] = set()
    for path, size, sha in stored.files:
        if not path or path.startswith("/") or ".." in path.split("/") or path in seen:
            raise InvalidInput(f"dataset file path {path!r}: relative, without '..', once")
        if size < 0 or not _is_sha256(sha):
            raise InvalidInput(f"dataset file {path!r}: a size and a hex SHA-256")
        seen.add(path)
    if sum(size for _, size, _ in stored.files) != stored.size:
        raise InvalidInput("a dataset's size must be the sum of its files' sizes")


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
