"""`detflow assets`: list and fetch named assets (datasets, weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import MirrorOpt, QuietOpt, RawDirOpt, progress_on

app = typer.Typer(no_args_is_help=True, help="List and fetch named assets (datasets, weights).")


@app.command("list")
def assets_list(
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    verify: Annotated[bool, typer.Option(help="verify checksums (slower)")] = False,
) -> None:
    """Show every named asset, its license and where it is available."""
    from pipeline import assets

    for row in assets.list_assets(raw_dir=raw_dir, mirrors=mirror, verify=verify):
        pin = (f"sha256 {row['sha256']}" if row["sha256"] else f"sha256 prefix {row['sha256_prefix']} (full "
               "sha256 not published)" if row["sha256_prefix"] else "sha256 not pinned (--trust)")
        typer.echo(f"{row['name']:<14} {row['kind']:<4} {row['license']:<10} "
                   f"{'available' if row['available'] else 'NOT AVAILABLE'}  {row['url']}  {pin}")
        for loc in row["locations"]:
            typer.echo(f"{'':<16}{loc['where']:<7} {loc['status']:<8} {loc['path']}")


@app.command("fetch")
def assets_fetch(
    name: str,
    raw_dir: RawDirOpt = Path("data/raw"),
    mirror: MirrorOpt = None,
    trust: Annotated[bool, typer.Option(help="accept an asset without a pinned checksum")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Materialise an asset under data/raw/NAME (verified), ready for `dvc add`."""
    from pipeline import assets

    path = assets.fetch(name, raw_dir=raw_dir, mirrors=mirror, trust=trust, progress=progress_on(quiet))
    typer.echo(f"{name}: {path}")
