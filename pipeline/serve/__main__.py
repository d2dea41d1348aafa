"""``python -m pipeline.serve --model models/model.onnx --host 127.0.0.1 --port 8000`` (same as ``detflow serve``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pipeline.errors import ConfigError, DetflowError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: argument --port: invalid int value: 'abc'``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m pipeline.serve", description=__doc__)
    p.add_argument("--model", help="ONNX model (model_card.json next to it); default models/model.onnx")
    p.add_argument("--card", help="model card, when not next to the model")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--providers", help="auto, or a comma list such as CPUExecutionProvider")
    p.add_argument("--require-gpu", action="store_true", default=None, help="fail unless CUDA is active")
    p.add_argument("--workers", type=int, help="inference thread pool size (default: CPU count)")
    p.add_argument("--microbatch", action="store_true", default=None, help="batch concurrent requests")
    p.add_argument("--log-level", help="critical, error, warning, info (default), debug")
    a = p.parse_args(argv)
    from pipeline.serve.server import serve

    try:
        serve(a.model, a.host, a.port, card=a.card, providers=a.providers, require_gpu=a.require_gpu,
              workers=a.workers, microbatch=a.microbatch, log_level=a.log_level)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DetflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
