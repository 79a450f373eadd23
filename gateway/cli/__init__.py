"""The ``sealroom`` command line: one verb group per role's work, every verb with ``--json``.

sealroom ca init | ca issue NAME --role ROLE          operator (--role site: a remote site's)
sealroom up                                            operator: gateway + local site
sealroom model register | create-tiny                  operator: base models
sealroom site rotate-key                               operator: re-wrap the data keys
sealroom site join GATEWAY --name NAME                 a remote site, on its own machine
sealroom site dataset register NAME DIR --owner O      at a remote site: data stays there
sealroom dataset register | list                       data owner
sealroom policy put | get | versions | diff | check    data owner
sealroom job submit | get | list | watch | cancel      model team
sealroom job approve | deny | logs                     data owner
sealroom release download | verify                    model team, anyone offline
sealroom release review | approve | reject            data owner (custom_code: reviewed)
sealroom audit query | export | verify                 compliance
sealroom demo [--sites N]                              the whole story, end to end
"""

from __future__ import annotations

from pathlib import Path

import typer

from gateway.cli._admin import ca_app, model_app, up
from gateway.cli._audit import audit_app
from gateway.cli._common import STATE
from gateway.cli._data import dataset_app, policy_app
from gateway.cli._jobs import job_app
from gateway.cli._release import release_app
from gateway.cli._site import site_app

app = typer.Typer(
    help="Sealroom: train on data that never leaves its owner's custody.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _globals(
    home: Path = typer.Option(None, envvar="SEALROOM_HOME", help="deployment directory"),
    address: str = typer.Option(None, envvar="SEALROOM_ADDRESS", help="gateway host:port"),
    identity: str = typer.Option(
        None, "--as", envvar="SEALROOM_IDENTITY", help="the identity (issued name) to call as"
    ),
) -> None:
    if home is not None:
        STATE.home = home
    if address is not None:
        STATE.address = address
    STATE.identity = identity


app.add_typer(ca_app, name="ca")
app.command("up")(up)
app.add_typer(model_app, name="model")
app.add_typer(site_app, name="site")
app.add_typer(dataset_app, name="dataset")
app.add_typer(policy_app, name="policy")
app.add_typer(job_app, name="job")
app.add_typer(release_app, name="release")
app.add_typer(audit_app, name="audit")


@app.command("demo")
def demo(
    workdir: Path = typer.Option(None, help="where the demo deployment lives (default: temp)"),
    keep: bool = typer.Option(False, help="keep the demo deployment afterwards"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary at the end"),
    sites: int = typer.Option(
        0, help="the federated story instead: a gateway and this many remote sites (2 to 4)"
    ),
) -> None:
    """Play the whole story: owner registers data and policy, team submits, owner approves,
    the job trains in the enclave, the release is verified, the audit log is verified. With
    --sites N: N owners keep their data at N sites; one job per site."""
    if sites:
        from gateway.demo_sites import run_federated_demo

        code = run_federated_demo(sites=sites, workdir=workdir, keep=keep, as_json=as_json)
        raise typer.Exit(code=code)
    from gateway.demo import run_demo

    raise typer.Exit(code=run_demo(workdir=workdir, keep=keep, as_json=as_json))


def main() -> None:
    app()
