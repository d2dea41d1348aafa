"""``python -m pipeline.serve --model models/model.onnx --host 127.0.0.1 --port 8000``.

The options are ``detflow serve``'s: both are defined once, in :mod:`pipeline.serve.entry`.
"""

from __future__ import annotations

import sys

from pipeline.serve.entry import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
