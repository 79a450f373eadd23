"""Model team and data owner verbs for jobs: submit, watch, approve or deny, logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from gateway.cli._common import JsonOpt, client, console, emit, errors, to_json
from gateway.client import JobView

job_app = typer.Typer(help="Training jobs.", no_args_is_help=True)


def _summary(j: JobView) -> str:
    line = f"job {j.id} ({j.name}): {j.state}"
    if j.reasons:
        line += "\n  " + "\n  ".join(j.reasons)
    if j.details:  # the owners' view: what the site said about the run
        line += "\n  site: " + "\n  site: ".join(j.details)
    return line


@job_app.command("submit")
def job_submit(
    spec: Path = typer.Argument(..., help="the job spec (YAML or JSON)"),
    bundle: Path | None = typer.Option(None, help="code bundle: a directory or a tar.gz"),
    as_json: bool = JsonOpt,
) -> None:
    """Submit a job spec (and a code bundle for custom trainers)."""
    with errors(as_json), client() as c:
        j = c.submit(spec.read_text(), bundle=bundle)
        emit(as_json, to_json(j), _summary(j))


@job_app.command("get")
def job_get(job_id: str, as_json: bool = JsonOpt) -> None:
    """Show a job."""
    with errors(as_json), client() as c:
        j = c.job(job_id)
        emit(as_json, to_json(j), _summary(j))


@job_app.command("list")
def job_list(
    state: str = typer.Option("", help="only jobs in this state"), as_json: bool = JsonOpt
) -> None:
    """List the jobs you may see."""
    with errors(as_json), client() as c:
        jobs = c.jobs(state)

        def text() -> None:
            t = Table("id", "name", "state", "submitter", "datasets", "updated")
            for j in jobs:
                t.add_row(
                    j.id,
                    j.name,
                    j.state,
                    j.submitter,
                    ", ".join(f"{d.name}@v{d.version}" for d in j.datasets),
                    j.updated_at,
                )
            console.print(t)

        emit(as_json, to_json(jobs), text)


@job_app.command("approve")
def job_approve(
    job_id: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt
) -> None:
    """Approve a job naming your dataset (binds its spec, bundle, data and policy versions)."""
    with errors(as_json), client() as c:
        j = c.decide(job_id, approve=True, reason=reason)
        emit(as_json, to_json(j), _summary(j))


@job_app.command("deny")
def job_deny(
    job_id: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt
) -> None:
    """Deny a job naming your dataset."""
    with errors(as_json), client() as c:
        j = c.decide(job_id, approve=False, reason=reason)
        emit(as_json, to_json(j), _summary(j))


@job_app.command("cancel")
def job_cancel(
    job_id: str, reason: str = typer.Option("", help="why"), as_json: bool = JsonOpt
) -> None:
    """Cancel a job that has not ended."""
    with errors(as_json), client() as c:
        j = c.cancel(job_id, reason)
        emit(as_json, to_json(j), _summary(j))


@job_app.command("watch")
def job_watch(job_id: str, as_json: bool = JsonOpt) -> None:
    """Follow a job's states and progress until it ends (a progress bar; --json: JSON lines)."""
    with errors(as_json), client() as c:
        final = None
        if as_json:
            for e in c.watch(job_id):
                sys.stdout.write(json.dumps(to_json(e), sort_keys=True) + "\n")
                sys.stdout.flush()
                final = e
        else:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                console=console,
                transient=False,
            ) as bar:
                task = bar.add_task(job_id, total=None, loss="-")
                for e in c.watch(job_id):
                    final = e
                    if e.progress is not None:
                        step, total, loss = e.progress
                        bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")
                    else:
                        bar.console.print(
                            f"{e.time}  {e.state}" + (f"  {e.reason}" if e.reason else "")
                        )
        if final is not None and final.state not in ("RELEASED",):
            raise typer.Exit(code=3 if final.terminal else 0)


@job_app.command("logs")
def job_logs(job_id: str, as_json: bool = JsonOpt) -> None:
    """Print a job's stdout and stderr (data owners and operators; they can carry data)."""
    with errors(as_json), client() as c:
        data = c.logs(job_id)

        def text() -> None:
            sys.stdout.write(data.decode("utf-8", "replace"))

        emit(as_json, {"job_id": job_id, "logs": data.decode("utf-8", "replace")}, text)


@job_app.command("try")
def job_try(
    spec: Path = typer.Argument(..., help="the job spec (YAML or JSON)"),
    mock: list[str] = typer.Option(..., help="NAME=DIR: a dataset's published mock (repeat)"),
    model: Path = typer.Option(..., help="the base model directory (Hugging Face format)"),
    bundle: Path | None = typer.Option(None, help="code bundle: a directory or a tar.gz"),
    policy: list[Path] = typer.Option([], help="a dataset's policy YAML, for its release rules"),
    image: str = typer.Option("sealroom-runtime:latest", help="the runtime image"),
    as_json: bool = JsonOpt,
) -> None:
    """Dry-run a job on mock datasets, locally, in the enclave's container and gate.

    No approval and no real data: the same image, isolation, harness and release checks
    (except memorization, which needs the real data) run on the owners' mocks."""
    import tempfile

    from enclave.runtime import DockerRuntime
    from enclave.tryrun import try_run
    from gateway.client import pack_directory
    from policies.document import parse_policy
    from policies.errors import InvalidInput
    from policies.spec import parse_spec

    with errors(as_json):
        job = parse_spec(spec.read_text())
        mocks: dict[str, Path] = {}
        for item in mock:
            name, sep, directory = item.partition("=")
            if not sep or not Path(directory).is_dir():
                raise InvalidInput(f"--mock {item!r}: expected NAME=DIR with an existing DIR")
            mocks[name] = Path(directory).resolve()
        wanted = {ref.name for ref in job.datasets}
        if set(mocks) != wanted:
            raise InvalidInput(
                f"--mock: the spec names {sorted(wanted)}, mocks were given for {sorted(mocks)}"
            )
        rules = {}
        for p in policy:
            doc = parse_policy(p.read_text())
            rules[doc.dataset] = doc.release
        with tempfile.TemporaryDirectory() as tmp:
            packed = None
            if bundle is not None:
                packed = (
                    pack_directory(bundle, Path(tmp) / "b.tar.gz", gzip=True)
                    if bundle.is_dir()
                    else bundle
                )
            result = try_run(
                job,
                mocks=mocks,
                model_dir=model.resolve(),
                bundle=packed,
                rules=rules,
                runtime=DockerRuntime(),
                image=image,
            )
        data = {
            "state": result.state,
            "exit_code": result.exit_code,
            "reason": result.reason,
            "would_release": result.would_release,
            "metrics": dict(result.metrics),
            "checks": [
                {
                    "dataset": c.dataset,
                    "check": c.check,
                    "passed": c.passed,
                    "reasons": list(c.reasons),
                }
                for c in result.checks
            ],
            "logs_tail": result.logs[-2000:].decode(errors="replace"),
        }

        def text() -> None:
            console.print(f"container: {result.state} (exit {result.exit_code}) {result.reason}")
            for c in result.checks:
                mark = "[green]pass[/]" if c.passed else "[red]fail[/]"
                console.print(f"  {c.dataset}: {c.check}: {mark} {'; '.join(c.reasons)}")
            console.print(f"metrics: {dict(result.metrics)}")
            console.print(
                "would be released" if result.would_release else "[red]would NOT be released[/]"
            )

        emit(as_json, data, text)
        if not result.would_release:
            raise typer.Exit(1)
