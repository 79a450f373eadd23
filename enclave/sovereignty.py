"""The site's own check of a run order, before any data key is released: the site trusts no
gateway.

:func:`check_order` holds an order to what the data owners themselves signed:

1. **Policies.** Each dataset's policy text came signed by its owner with its version number
   (their CA-issued key, :func:`policies.signing.policy_message`), so the site runs under rules
   the owner wrote, not rules a gateway wrote for them; and never under an older version than
   one it has run under (:class:`PolicyBook`, the site's own record), so a gateway cannot
   replay a policy its owner replaced (a looser one, say, under automatic approval) once the
   site has seen the replacement.
2. **The binding.** The approval binding is recomputed here from the order (its spec hash, which
   the site has checked against the spec; its bundle hash, checked against the bundle; the
   dataset versions; each policy text's version and digest) and must be the one the order names.
3. **Approvals.** Where a dataset's signed policy needs a person's approval (manual or quorum
   mode, or reviewed custom code), that many distinct owners signed an approval of exactly this
   binding in their own clients (:func:`policies.signing.approval_message`). Another job's
   approval, an approval by someone who is not the dataset's owner, or none, is refused. (A
   dataset has one owner, so a quorum above one cannot be met; the gateway refuses such a job
   at submission.)

Who owns a dataset: the site's own record where it keeps one (a remote site registers its
datasets for an owner, :mod:`enclave.owners`), else the order's word (the gateway's own local
site, which shares the gateway's process). Raises :class:`policies.errors.SignatureError` or
:class:`policies.errors.PolicyViolation` naming the dataset and what failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from enclave.contract import RunOrder
from enclave.secretfile import write_secret
from enclave.signatures import verify
from policies import access, document
from policies.approval import ApprovalBinding
from policies.document import ApprovalMode
from policies.errors import InvalidInput, PolicyViolation, SiteError
from policies.identity import Role
from policies.signing import approval_message, policy_message

Owners = Callable[[str], str | None]
"""dataset -> its owner as the site records it (None: the site keeps no record of it)."""


def order_policies(order: RunOrder) -> dict[str, document.PolicyDocument]:
    """The policies in force for the order's datasets, parsed from the order's texts (checked
    against their owners' signatures by :func:`check_order`). Raises :class:`SiteError` for a
    dataset whose policy did not come with the order."""
    out = {}
    for dataset, _ in order.datasets:
        text = order.policy_documents.get(dataset)
        if text is None:
            raise SiteError(f"no policy for {dataset} came with the run order")
        out[dataset] = document.parse_policy(text)
    return out


def check_order(
    order: RunOrder,
    policies: Mapping[str, document.PolicyDocument],
    *,
    ca_cert_pem: bytes,
    owners: Owners,
    book: PolicyBook | None = None,
) -> None:
    """See the module. ``policies`` are the order's texts, parsed; ``book``, the site's record
    of the policy versions it has run under, is checked and, once every check has passed,
    advanced."""
    owner_of: dict[str, str] = {}
    for name, _ in order.datasets:
        owner = owners(name) or order.dataset_owners.get(name, "")
        if not owner:
            raise PolicyViolation(f"dataset {name}: no owner is known for it")
        owner_of[name] = owner
        cert, signature = order.policy_signatures.get(name, ("", ""))
        verify(
            cert_pem=cert,
            signature=signature,
            message=policy_message(name, order.policy_versions[name], order.policy_documents[name]),
            ca_cert_pem=ca_cert_pem,
            name=owner,
            role=Role.DATA_OWNER,
            what=f"the policy of {name}",
        )
    binding = ApprovalBinding.create(
        job_id=order.job_id,
        spec_digest=order.spec_sha256,
        bundle_digest=order.bundle_sha256 or None,
        dataset_versions=dict(order.datasets),
        policies=[
            document.parse_policy(order.policy_documents[n], version=order.policy_versions[n]).ref()
            for n, _ in order.datasets
        ],
    ).digest()
    if binding != order.approval_binding:
        raise PolicyViolation(
            f"the order's approval binding {order.approval_binding[:16]} is not the binding of "
            f"what it asks to run ({binding[:16]}): the job, its spec, bundle, dataset versions "
            "or policies differ from what was approved"
        )
    for name, _ in order.datasets:
        policy = policies[name]
        needed = policy.approval.mode is not ApprovalMode.AUTOMATIC or access.needs_review(
            order.spec, policy
        )
        if not needed:
            continue
        quorum = max(policy.approval.quorum, 1)
        if quorum > 1:  # one owner per dataset: the gateway refuses such a job at submission
            raise PolicyViolation(
                f"dataset {name}: its policy needs {quorum} approvals and it has one owner"
            )
        cert, signature = order.approval_signatures.get(owner_of[name], ("", ""))
        verify(
            cert_pem=cert,
            signature=signature,
            message=approval_message(binding, "approve"),
            ca_cert_pem=ca_cert_pem,
            name=owner_of[name],
            role=Role.DATA_OWNER,
            what=f"the approval of dataset {name} by {owner_of[name]}",
        )
    if book is not None:
        book.admit(
            {
                name: (
                    order.policy_versions[name],
                    hashlib.sha256(order.policy_documents[name].encode()).hexdigest(),
                )
                for name, _ in order.datasets
            }
        )


class PolicyBook:
    """The newest policy version of each dataset this site has run under, with its text's
    digest, in the site's own file (one JSON object, rewritten atomically). An order under an
    older version, or under the same version with another text, is refused.

    The dataset's owner may also tell the site a version directly (:meth:`pin`, ``sealroom site
    policy pin``): from then on the site runs under nothing older, even a version it has never
    seen an order under, so a gateway cannot hold back the owner's newer policy by sending only
    orders under an older one. A pin records no text (the owner's signature on the order's
    text is what vouches for it); the first order under that version records its digest.

    The site process (its threads) and the owner's CLI may write the file at once: each change
    takes an exclusive lock on ``PATH.lock`` around its read and write (``flock`` on a file
    opened for the change, so threads of one process exclude each other too).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of_site(cls, root: Path) -> PolicyBook:
        """The record of the site whose state is under ``root`` (:class:`~enclave.agent.SiteAgent`
        keeps it)."""
        return cls(root / "keys" / "policy-versions.json")

    def held(self) -> dict[str, tuple[int, str]]:
        """dataset -> (newest version, its text's digest; "" for a version pinned by its owner
        and not yet run under)."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SiteError(f"the site's policy record {self.path.name} cannot be read") from e
        try:
            return {str(k): (int(v[0]), str(v[1])) for k, v in raw.items()}
        except (AttributeError, TypeError, ValueError, IndexError) as e:
            raise SiteError(f"the site's policy record {self.path.name} is malformed") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, tuple[int, str]]]:
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.held()

    def _write(self, held: Mapping[str, tuple[int, str]]) -> None:
        write_secret(self.path, json.dumps(dict(held), sort_keys=True).encode())

    def admit(self, versions: Mapping[str, tuple[int, str]]) -> None:
        """Check ``versions`` (dataset -> (version, text digest)) against the record and keep
        the newer ones; raises PolicyViolation, recording nothing, for one that is older."""
        with self._locked() as held:
            for name, (version, digest) in sorted(versions.items()):
                if name not in held:
                    continue
                newest, newest_digest = held[name]
                if version < newest:
                    raise PolicyViolation(
                        f"dataset {name}: the order runs under policy version {version}, but "
                        + (
                            f"this site has run under version {newest}: an older policy is "
                            "never used again"
                            if newest_digest
                            else f"its owner told this site to run under version {newest} or "
                            "a later one"
                        )
                    )
                if version == newest and newest_digest and digest != newest_digest:
                    raise PolicyViolation(
                        f"dataset {name}: policy version {version} is not the text this site "
                        "ran under as that version"
                    )
            changed = False
            for name, (version, digest) in versions.items():
                if name not in held or version > held[name][0] or not held[name][1]:
                    held[name] = (version, digest)
                    changed = True
            if changed:
                self._write(held)

    def pin(self, dataset: str, version: int) -> int:
        """The owner's word: run ``dataset`` under ``version`` or a later one. Returns the
        version now held; raises InvalidInput for a version older than the one held."""
        if version < 1:
            raise InvalidInput(f"a policy version is numbered from 1, not {version}")
        with self._locked() as held:
            newest = held.get(dataset, (0, ""))[0]
            if version < newest:
                raise InvalidInput(
                    f"dataset {dataset}: this site already runs under policy version {newest} "
                    f"or later; {version} is older"
                )
            if version > newest:
                held[dataset] = (version, "")
                self._write(held)
            return version
