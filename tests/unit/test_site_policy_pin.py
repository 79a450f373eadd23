"""`sealroom site policy pin`, run by a data owner at the site against the site's home: the
version floor goes into the site's own record, for the owner's datasets only, and never down."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from enclave.sovereignty import PolicyBook
from gateway.cli import app


def _sealroom(home: Path, *args: str) -> tuple[int, dict[str, object], str]:
    r = CliRunner().invoke(app, ["--home", str(home), *args, "--json"])
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    return r.exit_code, doc, r.output


def test_an_owner_pins_a_policy_version_at_their_site(tmp_path: Path) -> None:
    home = tmp_path / "site-home"
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("a protected text\n")
    code, _, out = _sealroom(
        home, "site", "dataset", "register", "books", str(books), "--owner", "olivia"
    )
    assert code == 0, out
    code, doc, out = _sealroom(home, "site", "policy", "pin", "books", "3", "--owner", "olivia")
    assert code == 0 and doc == {"dataset": "books", "version": 3}, out
    assert PolicyBook.of_site(home / "site").held() == {"books": (3, "")}
    # Another owner, a dataset the site does not keep, and a lower version: refused, named.
    for args, words in (
        (("books", "4", "--owner", "otto"), "belongs to olivia"),
        (("notes", "1", "--owner", "olivia"), "no dataset notes"),
        (("books", "2", "--owner", "olivia"), "already runs under policy version 3"),
    ):
        code, doc, out = _sealroom(home, "site", "policy", "pin", *args)
        assert code == 1 and words in json.dumps(doc), (args, out)
    assert PolicyBook.of_site(home / "site").held() == {"books": (3, "")}
