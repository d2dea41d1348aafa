"""``python -m pipeline.cli``: the `detflow` command."""

from pipeline.cli import main

main()
