"""`detflow serve`: the HTTP service; its options are defined once, with `python -m pipeline.serve`
(pipeline/serve/entry.py)."""

from __future__ import annotations

import typer

from pipeline.serve.entry import typer_command as serve_command

app = typer.Typer()
app.command("serve")(serve_command())
