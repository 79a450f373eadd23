"""Reading the audit log: roots and proofs from the in-memory tree, records and compliance
queries from the database.

A query by an indexed column (:data:`~enclave.audit._store.INDEXED`) reads the records listed
in the ``lookup`` table through its indexes, and the short tail not yet indexed from the records
themselves, in one read transaction, so it never misses a record; every condition is then
checked on the records. Values are always bound as parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from enclave.audit._model import AuditRecord, decode_leaf, normal_time
from enclave.audit._store import INDEXED, Store
from policies.errors import InvalidInput

if TYPE_CHECKING:
    from enclave.audit._report import DatasetReport


class Queries(Store):
    """The reading half of :class:`~enclave.audit.AuditLog`."""

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` records (default: all)."""
        n = len(self._tree) if size is None else size
        self._check_size(n, allow_empty=True)
        return self._tree.root(n)

    def _check_size(self, n: int, *, allow_empty: bool = False) -> None:
        if not (0 if allow_empty else 1) <= n <= len(self._tree):
            raise InvalidInput(f"size {n}: the log has {len(self._tree)} records")

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 audit path of record ``seq`` in the tree of the first ``size``."""
        n = len(self._tree) if size is None else size
        self._check_size(n)
        if not 0 <= seq < n:
            raise InvalidInput(f"seq {seq} is not in a tree of size {n}")
        return self._tree.inclusion_proof(seq, n)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The RFC 9162 proof that the tree of ``new_size`` extends the one of ``old_size``."""
        n = len(self._tree) if new_size is None else new_size
        if not 0 < old_size <= n <= len(self._tree):
            raise InvalidInput(
                f"no consistency proof from {old_size} to {n}: the log has "
                f"{len(self._tree)} records"
            )
        return self._tree.consistency_proof(old_size, n)

    def leaves(self, start: int, stop: int) -> Iterator[bytes]:
        """The leaves of records ``start`` to ``stop - 1``, in order, read in batches."""
        self._check_size(stop, allow_empty=True)
        while start < stop:
            end = min(stop, start + 1024)
            with self._rlock:
                rows = self._rdb.execute(
                    "SELECT leaf FROM records WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (start, end),
                ).fetchall()
            for (leaf,) in rows:
                yield bytes(leaf)
            start = end

    def record(self, seq: int) -> AuditRecord:
        """Record ``seq``. Raises InvalidInput if there is none."""
        with self._rlock:
            row = self._rdb.execute(
                "SELECT leaf, leaf_hash FROM records WHERE seq=?", (seq,)
            ).fetchone()
        if row is None:
            raise InvalidInput(f"no audit record {seq}")
        s, time, event = decode_leaf(bytes(row[0]))
        return AuditRecord(s, time, event, bytes(row[1]))

    def query(
        self,
        *,
        job: str | None = None,
        dataset: str | None = None,
        file: str | None = None,
        principal: str | None = None,
        role: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 1000,
    ) -> list[AuditRecord]:
        """Records matching every given filter, oldest first, at most ``limit``. ``dataset``
        matches ``name`` (every version) or ``name@vN``; ``action`` ending in ``*`` is a
        prefix; ``since``/``until`` are RFC 3339 times (inclusive)."""
        if limit <= 0:
            raise InvalidInput("limit: must be positive")
        terms: list[tuple[str, str, list[str]]] = []  # (column, condition, its arguments)
        for col, val in (
            ("job_id", job),
            ("file", file),
            ("principal", principal),
            ("role", role),
            ("outcome", outcome),
        ):
            if val:
                terms.append((col, f"{col} = ?", [val]))
        if dataset:
            if "@" in dataset:
                terms.append(("dataset", "dataset = ?", [dataset]))
            else:
                terms.append(
                    (
                        "dataset",
                        "(dataset = ? OR dataset GLOB ?)",
                        [dataset, _glob(dataset) + "@v*"],
                    )
                )
        if action:
            if action.endswith("*"):
                terms.append(("action", "action GLOB ?", [_glob(action[:-1]) + "*"]))
            else:
                terms.append(("action", "action = ?", [action]))
        if since:
            terms.append(("time", "time >= ?", [normal_time(since)]))
        if until:
            terms.append(("time", "time <= ?", [normal_time(until)]))
        every = " AND ".join(["1", *(cond for _, cond, _ in terms)])
        args = [a for _, _, a_ in terms for a in a_]
        indexed = [(cond, a_) for col, cond, a_ in terms if col in INDEXED]
        if indexed and self._lookup:
            # The indexed records through the lookup table, then the tail not yet indexed;
            # both filtered on the records themselves, in one read transaction. (The
            # conditions are fixed text from above; every value is bound as a parameter.)
            sql = (
                "SELECT seq, leaf, leaf_hash FROM records WHERE seq IN (SELECT seq FROM lookup "  # noqa: S608
                f"WHERE {' AND '.join(c for c, _ in indexed)}) AND {every} UNION ALL "
                "SELECT seq, leaf, leaf_hash FROM records WHERE seq > "
                f"(SELECT IFNULL(MAX(seq), -1) FROM lookup) AND {every} ORDER BY seq LIMIT ?"
            )
            args = [*(a for _, a_ in indexed for a in a_), *args, *args]
        else:
            sql = f"SELECT seq, leaf, leaf_hash FROM records WHERE {every} ORDER BY seq LIMIT ?"  # noqa: S608
        with self._rlock:
            rows = self._rdb.execute(sql, (*args, limit)).fetchall()
        out = []
        for _, leaf, lh in rows:
            s, time, event = decode_leaf(bytes(leaf))
            out.append(AuditRecord(s, time, event, bytes(lh)))
        return out

    def report(self, dataset: str) -> DatasetReport:
        """The compliance report for ``dataset`` (see :mod:`enclave.audit._report`)."""
        from enclave.audit._report import dataset_report

        if not dataset:
            raise InvalidInput("dataset: name the dataset the report is about")
        every = 10**9
        return dataset_report(
            dataset,
            self.query(dataset=dataset, limit=every),
            [
                r
                for a in ("job.submit", "job.approve", "job.deny")
                for r in self.query(action=a, limit=every)
            ],
            [
                r
                for a in ("release.sign", "release.download")
                for r in self.query(action=a, limit=every)
            ],
        )


def _glob(text: str) -> str:
    """``text`` as a GLOB pattern that matches only itself (GLOB is case-sensitive, unlike
    LIKE, and an index serves a GLOB prefix)."""
    return text.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]")
