"""`detflow registry`: list, promote and roll back registered model versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import model_params

app = typer.Typer(no_args_is_help=True, help="List, promote and roll back registered model versions.")


RegistryRootOpt = Annotated[Path | None, typer.Option("--root", help="registry folder; default: the folder of "
                                                      "gate.champion in params.yaml (models/registry)")]


def _registry_root(root: Path | None, params: Path = Path("params.yaml")) -> Path:
    return root if root is not None else Path(model_params(params, None).gate.champion).parent


@app.command("list")
def registry_list(root: RegistryRootOpt = None) -> None:
    """Show every registered model version, oldest first; * marks the champion."""
    from pipeline import registry

    root = _registry_root(root)
    versions = registry.list_versions(root)
    if not versions:
        typer.echo(f"no model versions in {root} (run `detflow flow run`)")
        return
    for v in versions:
        commit = (v.get("git_commit") or "-")[:10] + ("+dirty" if v.get("git_dirty") else "")
        map50 = "n/a" if v.get("map50") is None else f"{v['map50']:.4f}"
        typer.echo(f"{'*' if v['champion'] else ' '} {v['version']:<5} {v['created_at']}  sha256 {v['sha256'][:12]}  "
                   f"mAP50 {map50}  {v.get('family')}/{v.get('model')}  git {commit}")


@app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Argument(help="version to make champion, e.g. v3")],
    root: RegistryRootOpt = None,
) -> None:
    """Make VERSION the champion (atomic switch of champion.json; the old champion is kept for rollback)."""
    from pipeline import registry

    root = _registry_root(root)
    before = registry.champion(root)
    pointer = registry.promote(version, root, reason="detflow registry promote")
    if before is not None and before["version"] == pointer["version"]:
        typer.echo(f"{pointer['version']} is already the champion")
        return
    typer.echo(f"champion: {pointer['version']} (sha256 {pointer['sha256'][:12]}); "
               f"previous: {pointer['previous'] or 'none'}")


@app.command("rollback")
def registry_rollback(root: RegistryRootOpt = None) -> None:
    """Make the previous champion current again (repeatable down the promotion history)."""
    from pipeline import registry

    root = _registry_root(root)
    before = registry.champion(root)
    pointer = registry.rollback(root, reason="detflow registry rollback")
    typer.echo(f"rolled back {before['version'] if before else '?'} -> champion: {pointer['version']} "
               f"(sha256 {pointer['sha256'][:12]}); previous: {pointer['previous'] or 'none'}")
