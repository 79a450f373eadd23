"""Data owner verbs: datasets and their policies."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gateway.cli._common import JsonOpt, client, console, emit, errors, to_json
from policies import document

dataset_app = typer.Typer(help="Datasets (data owner).", no_args_is_help=True)
policy_app = typer.Typer(help="Access and release policies (data owner).", no_args_is_help=True)


@dataset_app.command("register")
def dataset_register(
    name: str,
    source: Path = typer.Argument(..., help="a directory or a tar archive"),
    description: str = typer.Option("", help="what the data is"),
    as_json: bool = JsonOpt,
) -> None:
    """Register SOURCE as the next version of dataset NAME (encrypted at rest in the site)."""
    with errors(as_json), client() as c:
        d = c.register_dataset(name, source, description=description)
        emit(
            as_json,
            to_json(d),
            f"dataset {d.name} v{d.version}: {len(d.files)} files, {d.size} bytes, "
            f"root {d.root_hash[:16]}",
        )


@dataset_app.command("list")
def dataset_list(as_json: bool = JsonOpt) -> None:
    """List dataset versions."""
    with errors(as_json), client() as c:
        ds = c.datasets()

        def text() -> None:
            t = Table("name", "version", "owner", "files", "bytes", "root hash")
            for d in ds:
                t.add_row(
                    d.name,
                    str(d.version),
                    d.owner,
                    str(len(d.files)),
                    str(d.size),
                    d.root_hash[:16],
                )
            console.print(t)

        emit(as_json, to_json(ds), text)


@policy_app.command("put")
def policy_put(dataset: str, path: Path, as_json: bool = JsonOpt) -> None:
    """Write a new version of DATASET's policy from a YAML file."""
    with errors(as_json), client() as c:
        p = c.put_policy(dataset, path.read_text())
        emit(as_json, to_json(p), f"policy of {p.dataset} is now v{p.version} ({p.sha256[:16]})")


@policy_app.command("check")
def policy_check(path: Path, as_json: bool = JsonOpt) -> None:
    """Validate a policy file locally (errors name the line and field)."""
    with errors(as_json):
        doc = document.parse_policy(path.read_text())
        emit(as_json, {"dataset": doc.dataset, "valid": True}, f"{path}: valid ({doc.dataset})")


@policy_app.command("get")
def policy_get(
    dataset: str, version: int = typer.Option(0, help="0: current"), as_json: bool = JsonOpt
) -> None:
    """Print a version of DATASET's policy."""
    with errors(as_json), client() as c:
        p = c.policy(dataset, version)
        emit(as_json, to_json(p), lambda: console.print(p.document, markup=False))


@policy_app.command("versions")
def policy_versions(dataset: str, as_json: bool = JsonOpt) -> None:
    """List every version of DATASET's policy."""
    with errors(as_json), client() as c:
        vs = c.policy_versions(dataset)

        def text() -> None:
            for p in vs:
                console.print(f"v{p.version}  {p.created_at}  {p.author}  {p.sha256[:16]}")

        emit(as_json, to_json(vs), text)


@policy_app.command("diff")
def policy_diff(dataset: str, old: int, new: int, as_json: bool = JsonOpt) -> None:
    """Show what changed between two versions of DATASET's policy."""
    with errors(as_json), client() as c:
        a, b = c.policy(dataset, old), c.policy(dataset, new)
        diff = document.diff_policies(a.document, b.document)
        emit(
            as_json,
            {"dataset": dataset, "old": old, "new": new, "diff": diff},
            lambda: console.print(diff or "(no change)", markup=False),
        )


@dataset_app.command("mock")
def dataset_mock(
    src: Path = typer.Argument(..., help="the real dataset directory (stays on your side)"),
    dest: Path = typer.Argument(..., help="where to write the mock (a new directory)"),
    seed: int = typer.Option(0, help="the generator's seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Generate a mock of a dataset: the same files and structure, none of the content.

    Publish the mock to the model teams (it holds no data); they dry-run their jobs on it with
    `sealroom job try SPEC --mock NAME=DIR`."""
    from gateway.mock import generate_mock

    with errors(as_json):
        files = generate_mock(src, dest, seed=seed)
        emit(
            as_json,
            {"mock": str(dest), "files": files},
            f"mock of {src} in {dest}: {len(files)} files with the same shape",
        )
