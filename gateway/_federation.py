"""Every site a gateway serves, as the one :class:`enclave.contract.Site` its dispatcher runs
jobs at: the gateway's own local site (in its process, if it has one) and the remote sites that
dial in over the site link (:mod:`gateway._sitelink`).

A job runs where its datasets are kept: the catalogue records, for each dataset version, the
remote site that keeps it (empty for the local site). A job whose datasets are kept at two sites
is refused at submission; should one reach a run, it ends ``ERROR`` here, before any site sees
it. A federated job is the exception: it runs in rounds at every site that keeps one of its
datasets (:mod:`gateway._rounds`), each remote site reached through its round mailbox
(:mod:`gateway._roundlink`), the local site in process; its release is signed here, with the
gateway's identity, and countersigned by each site.

Datasets of remote sites are registered at the site (their bytes never reach the gateway);
``store_dataset`` stores into the local site, and without one says where to register instead.
The run logs of a remote site stay there, like its data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from enclave.contract import Report, RunOrder, Site, SiteReport, StoredDataset
from enclave.federated import RoundSite
from enclave.identity import IdentityFiles
from gateway._roundlink import RemoteRoundSite, RoundMailbox
from gateway._rounds import FederatedJob, OnGrid
from gateway._sitelink import SiteLinks
from policies import channels, document
from policies.channels import TeamReason
from policies.errors import InvalidInput, ReleaseRefused, SealroomError, SiteError
from policies.lifecycle import JobState

Locate = Callable[[str, int], str]
"""(dataset, version) -> the remote site that keeps it, or "" for the local site."""


class Sites:
    """The local site (or None) and the remote ones, routed by where a job's data is kept."""

    def __init__(
        self,
        local: Site | None,
        links: SiteLinks,
        *,
        locate: Locate,
        rounds: RoundMailbox | None = None,
        local_rounds: RoundSite | None = None,
        federated_home: Path | None = None,
        signer: IdentityFiles | None = None,
    ) -> None:
        self.local = local
        self.links = links
        self._locate = locate
        self.name = local.name if local is not None else "remote-sites"
        self.rounds = rounds
        self.local_rounds = local_rounds
        self._federated_home = federated_home
        self._signer = signer

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
        if order.spec.is_federated:
            self._federated(order, report)
            return
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

    def _federated(self, order: RunOrder, report: Report, *, resumed: bool = False) -> None:
        """Run a federated job's rounds, then its release (see the module); ``resumed``: a
        job a previous gateway process started, gone on with from its last completed round."""
        rules = channels.job_channel_rules(
            document.parse_policy(t) for t in order.policy_documents.values()
        )
        team = OnGrid(report, quantum_s=rules.time_quantum_s)
        try:
            self._federated_on(order, team, resumed=resumed, loss_digits=rules.loss_digits)
        finally:
            team.close()

    def _federated_on(
        self, order: RunOrder, report: Report, *, resumed: bool, loss_digits: int
    ) -> None:
        job = order.job_id

        def end(state: JobState, reason: TeamReason, detail: str) -> None:
            report(SiteReport(job, state=state, reason=reason, detail=detail))

        if self.rounds is None or self._federated_home is None or self._signer is None:
            end(JobState.ERROR, TeamReason.ERROR, "this gateway runs no federated jobs")
            return
        sites: dict[str, RoundSite] = {}
        for name in sorted(self.where(order.datasets)):
            if name:
                sites[name] = RemoteRoundSite(name, self.rounds)
            elif self.local_rounds is not None:
                sites[self.local_rounds.name] = self.local_rounds
        if len(sites) < 2:
            end(JobState.ERROR, TeamReason.ERROR, f"a federated job at {len(sites)} site(s)")
            return
        fed = FederatedJob(
            order, report, sites=sites, home=self._federated_home, loss_digits=loss_digits
        )
        report(
            SiteReport(
                job,
                state=None if resumed else JobState.RUNNING,
                reason=TeamReason.RUNNING,
                audit_action="federated.resume" if resumed else "federated.start",
                details={"sites": sorted(sites), "rounds_done": len(fed.history)},
            )
        )
        all_done = len(fed.history) == fed.plan.rounds  # a restart during the release checks
        try:
            final = fed.run()
            if not (resumed and all_done):
                report(SiteReport(job, state=JobState.CHECKING, reason=TeamReason.CHECKING))
            release = fed.release(final, signer=self._signer)
        except ReleaseRefused as e:
            fed.finished()
            end(JobState.REJECTED, TeamReason.REJECTED_MEMORIZATION, str(e))
            return
        except SealroomError as e:
            fed.finished()
            end(JobState.ERROR, TeamReason.ERROR, f"federated: {e}")
            return
        fed.finished()
        metrics = json.loads((release / "metrics.json").read_text())
        report(
            SiteReport(
                job,
                state=JobState.RELEASED,
                reason=TeamReason.RELEASED,
                release_dir=release,
                metrics={k: float(v) for k, v in metrics.items()},
                # Signed here: the release record a takedown report lists, as a site's is.
                audit_action="release.sign",
                details={
                    "manifest_sha256": hashlib.sha256(
                        (release / "manifest.json").read_bytes()
                    ).hexdigest(),
                    "federated": True,
                    "rounds": len(fed.history),
                    "sites": sorted(sites),
                },
            )
        )

    def held(self) -> list[str]:
        """Jobs a previous gateway process left going: those it leased to a remote site whose
        leases are still live (on record), and federated jobs whose rounds or release it did not
        finish. The dispatcher takes each up again with :meth:`resume` rather than ending it as
        a run the restart cut short (:mod:`gateway._sitelink`, :mod:`gateway._rounds`)."""
        federated = FederatedJob.unfinished(self._federated_home) if self._federated_home else []
        return self.links.held() + federated

    def resume(self, job_id: str, report: Report) -> bool:
        """Take up what a previous gateway process left going: ``report`` gets its reports,
        and this blocks until the run ends (as :meth:`run`). False at once when none waits.
        A federated job goes on from its last completed round."""
        home = self._federated_home
        if home is not None and job_id in FederatedJob.unfinished(home):
            self._federated(FederatedJob.saved_order(home, job_id), report, resumed=True)
            return True
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
