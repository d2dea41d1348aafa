"""The service's entry point, defined once: the options shared by ``python -m pipeline.serve`` and ``detflow serve``.

One table, :data:`OPTIONS`, renders as an argparse parser (``python -m pipeline.serve``, :func:`main`: no CLI
framework needed, usage errors in argparse's words) and as a typer command (``detflow serve``,
:func:`typer_command`, in the project's CLI). Both hand the same keyword arguments to
:func:`pipeline.serve.server.serve`; every other setting comes from ``DETFLOW_SERVE_*`` variables.
Light on purpose (no FastAPI, no pydantic until the service starts): ``pipeline.cli`` imports it at start.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pipeline.errors import ConfigError, DetflowError

SUMMARY = "HTTP inference service (FastAPI + uvicorn); more settings in DETFLOW_SERVE_* variables (TOKEN enables auth)."


@dataclass(frozen=True)
class Option:
    """One command-line option; ``name`` is the keyword of ``serve()`` (``--require-gpu`` for ``require_gpu``)."""

    name: str
    type: type
    help: str
    min: int | None = None  # typer refuses smaller values while parsing; ServeSettings validates every value anyway

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("model", Path, "ONNX model (model_card.json next to it); default models/model.onnx"),
    Option("host", str, "bind address (default 127.0.0.1)"),
    Option("port", int, "port (default 8000)"),
    Option("card", Path, "model card, when not next to the model"),
    Option("providers", str, "auto, or a comma list such as CPUExecutionProvider"),
    Option("require_gpu", bool, "fail unless the CUDA provider is active"),
    Option("workers", int, "inference thread pool size (default: CPU count)", min=1),
    Option("microbatch", bool, "collect concurrent requests into one predict call"),
    Option("log_level", str, "critical, error, warning, info (default), debug"),
)


def start(**options: Any) -> None:
    """Serve until stopped with the given options (None: from DETFLOW_SERVE_* or the default)."""
    from pipeline.serve.server import serve

    serve(**options)


# ---------------------------------------------------------------------------------------------- python -m


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: argument --port: invalid int value: 'abc'``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str = "python -m pipeline.serve") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=SUMMARY)
    for o in OPTIONS:
        if o.type is bool:  # --require-gpu / --no-require-gpu; absent: None (the environment decides)
            p.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=None, help=o.help)
        else:
            p.add_argument(o.flag, type=o.type, help=o.help)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.serve``: exit 0, 2 (usage or settings), 1 (model, port, ...), 130 (interrupted)."""
    options = vars(parser().parse_args(argv))
    try:
        start(**options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DetflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------------------------- detflow serve


def typer_command() -> Callable[..., None]:
    """:func:`start` with a signature built from :data:`OPTIONS`, for ``app.command("serve")(typer_command())``.

    Errors propagate: ``pipeline.cli`` turns them into its one-line messages and exit codes.
    """
    import typer

    def serve(**options: Any) -> None:
        start(**options)

    serve.__doc__ = SUMMARY
    serve.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[o.type | None, typer.Option(help=o.help, min=o.min)])
        for o in OPTIONS])
    return serve
