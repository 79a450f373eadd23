"""Every site a gateway serves, as the one :class:`enclave.contract.Site` its dispatcher runs
jobs at: the gateway's own local site (in its process, if it has one) and the remote sites that
dial in over the site link (:mod:`gateway._sitelink`).

A job runs where its datasets are kept: the catalogue records, for each dataset version, the
remote site that keeps it (empty for the local site). A job whose datasets are kept at two sites
is refused at submission (federated jobs are another kind); should one reach a run, it ends
``ERROR`` here, before any site sees it.

Datasets of remote sites are registered at the site (their bytes never reach the gateway);
``store_dataset`` stores into the local site, and without one says where to register instead.
The run logs of a remote site stay there, like its data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from enclave.contract import Report, RunOrder, Site, SiteReport, StoredDataset
from gateway._sitelink import SiteLinks
from policies.channels import TeamReason
from policies.errors import InvalidInput, SiteError
from policies.lifecycle import JobState

Locate = Callable[[str, int], str]
"""(dataset, version) -> the remote site that keeps it, or "" for the local site."""


class Sites:
    """The local site (or None) and the remote ones, routed by where a job's data is kept."""

    def __init__(self, local: Site | None, links: SiteLinks, *, locate: Locate) -> None:
        self.local = local
        self.links = links
        self._locate = locate
        self.name = local.name if local is not None else "remote-sites"

    def where(self, datasets: tuple[tuple[str, int], ...]) -> set[str]:
        """The sites that keep ``datasets`` ("" is the local site)."""
        return {self._locate(name, version) for name, version in datasets}

    def store_dataset(self, name: str, *, archive: BinaryIO) -> StoredDataset:
        if self.local is None:
            raise InvalidInput(
                "this gateway keeps no datasets itself: register the dataset at the site that "
                "will keep it (sealroom site dataset register)"
            )
        return self.local.store_dataset(name, archive=archive)

    def run(self, order: RunOrder, report: Report) -> None:
        where = self.where(order.datasets)
        if len(where) != 1:
            report(
                SiteReport(
                    order.job_id,
                    state=JobState.ERROR,
                    reason=TeamReason.ERROR,
                    detail=f"the job's datasets are kept at different sites: {sorted(where)}",
                )
            )
            return
        (site,) = where
        if site:
            self.links.run(site, order, report)
        elif self.local is not None:
            self.local.run(order, report)
        else:
            raise SiteError("a dataset is recorded at the local site, and this gateway has none")

    def held(self) -> list[str]:
        """Jobs a previous gateway process leased to a remote site whose leases are still live
        (on record): the dispatcher takes each up again with :meth:`resume` rather than ending
        it as a run the restart cut short (:mod:`gateway._sitelink`)."""
        return self.links.held()

    def resume(self, job_id: str, report: Report) -> bool:
        """Take up a live lease of a previous gateway process: ``report`` gets its reports,
        and this blocks until the run ends (as :meth:`run`). False at once when none waits."""
        return self.links.resume(job_id, report)

    def cancel(self, job_id: str) -> None:
        if not self.links.cancel(job_id) and self.local is not None:
            self.local.cancel(job_id)

    def logs(self, job_id: str) -> bytes:
        if self.links.site_of(job_id) is not None or self.local is None:
            return b""  # a remote site's run logs stay at that site
        return self.local.logs(job_id)

    def image_id(self) -> str:
        return self.local.image_id() if self.local is not None else ""

    def rotate_key(self) -> tuple[str, int]:
        if self.local is None:
            raise InvalidInput("this gateway has no local site: each site rotates its own keys")
        return self.local.rotate_key()

    def close(self) -> None:
        self.links.close()
        if self.local is not None:
            self.local.close()
