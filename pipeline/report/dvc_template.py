"""The HTML template `dvc plots show` / `dvc plots diff` fill, with Vega, Vega-Lite and Vega-Embed inlined.

Why: DVC's own page loads them from a public CDN, so offline (an air-gapped site, CI) it renders blank. The bundle
comes from ``vl-convert-python`` (a pinned PyPI package that ships the libraries; nothing is fetched at view time).
The template has no ``{scripts}`` placeholder, so DVC adds no CDN tags; ``{plot_divs}`` is where its plots go.

    python -m pipeline.report.dvc_template --write   # writes .dvc/plots/offline.html (configured in .dvc/config)
    python -m pipeline.report.dvc_template --check   # exit 1 when the file differs from what --write would write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE = Path(".dvc/plots/offline.html")
VEGA_LITE = "v5.21"  # DVC's plot templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<!-- vega {vega}, vega-lite {vega_lite}, vega-embed {embed}: bundled by vl-convert-python {vlc}, no network -->
<script type="text/javascript">
@BUNDLE@
</script>
<style>body {{ font-family: "DejaVu Sans", Arial, sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def template_text() -> str:
    """The template for the installed vl-convert-python (deterministic for its version)."""
    from importlib import metadata

    import vl_convert

    head = PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", vega=vl_convert.get_vega_version(),
                       vega_lite=VEGA_LITE, embed=vl_convert.get_vega_embed_version(),
                       vlc=metadata.version("vl-convert-python"))
    # the bundle may contain "{...}" (JavaScript); DVC replaces only its three placeholders, so no escaping is needed
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    return head.replace("@BUNDLE@", bundle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TEMPLATE)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = template_text()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is missing or stale; run `python -m pipeline.report.dvc_template --write`",
                  file=sys.stderr)
            return 1
        return 0
    from pipeline.fileio import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out} ({len(text.encode()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
