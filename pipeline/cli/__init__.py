"""`detflow` command line: thin sub-apps, one module per concern, each command one thin entry: read params, call
the library, print one line. ``data`` (phantom, prepare), ``model`` (train, evaluate, export), ``inference``
(adapt, infer, shift), ``serve``, ``report``; the groups ``assets``, ``registry`` and ``flow``. ``common`` holds the
shared options and helpers.

Library code raises; only this package turns errors into messages and exit codes (here).
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from pipeline.cli import assets, data, flow, inference, model, registry, report, serve
from pipeline.errors import ConfigError, DetflowError

log = logging.getLogger("detflow")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="detflow: transfer-learning detection pipeline for medical imaging.")
# Sub-apps without a name add their commands at the top level (`detflow train`); named ones are groups.
app.add_typer(data.app)
app.add_typer(model.app)
app.add_typer(inference.app)
app.add_typer(assets.app, name="assets")
app.add_typer(serve.app)
app.add_typer(registry.app, name="registry")
app.add_typer(flow.app, name="flow")
app.add_typer(report.app)


def _fail(message: str, code: int) -> int:
    log.debug("the error's traceback", exc_info=True)  # DETFLOW_LOG=DEBUG shows it
    typer.secho(f"error: {message}", err=True, fg="red")
    return code


def _usage_error(e: typer.TyperException) -> int:
    """Typer's usage errors (its vendored click: UsageError, NoSuchOption, BadParameter, ...) as one line plus
    where help is, exit 2 as click does."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `detflow` / `detflow registry`: show the help (as typer)
        e.show()  # type: ignore[attr-defined]
        return e.exit_code
    hint = f" (see '{ctx.command_path} {ctx.help_option_names[0]}')" if ctx is not None else ""
    return _fail(f"{e.format_message().rstrip('.')}{hint}", e.exit_code)


def run(args: list[str] | None = None) -> int:
    """Run the CLI; return the exit code: 0 ok, 1 a failed stage or a bad input file, 2 a usage or params error.

    User errors print one line (``error: ...``), never a traceback. ``standalone_mode=False`` hands every error to
    us: typer >= 0.25 raises its own vendored click exceptions, which click's handlers would not recognise.
    """
    try:
        rc = app(args=args, standalone_mode=False)  # --help and typer.Exit return their code
        return rc if isinstance(rc, int) else 0
    except ConfigError as e:
        return _fail(str(e), 2)
    except DetflowError as e:
        return _fail(str(e), 1)
    except typer.TyperException as e:
        return _usage_error(e)
    except typer.Abort:
        return _fail("aborted", 1)
    except OSError as e:  # a file system problem that no check foresaw: disk full, a permission changed meanwhile
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def main() -> None:
    """Console entry: user errors become one clear message and exit 2 (usage, bad params) or 1, never a traceback."""
    logging.basicConfig(level=os.environ.get("DETFLOW_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run())


if __name__ == "__main__":
    main()
