"""How much the run report adds to opening a page in headless Chromium: the report against an empty page, the peer
measured in the same run (Chromium's own start-up is not the report's), interleaved.

    python bench/report_open.py --report reports/report.html --repeats 5

Prints the median seconds of each arm, ``report_minus_blank_s`` and ``report_over_blank``; writes
bench/results/report_open.json. Needs `chromium` (Debian package).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import interleaved, write_result


def open_page(chromium: str, page: Path, work: Path) -> None:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=5000", "--window-size=1280,9000", f"--screenshot={work / 'shot.png'}",
           page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, check=True, timeout=120, cwd=work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=Path("reports/report.html"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/report_open.json"))
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not args.report.is_file():
        print("needs `chromium` and an existing report (run `detflow report`)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        work = Path(tmp)
        blank = work / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body></body></html>")
        med = interleaved({"blank": lambda: open_page(chromium, blank, work),
                           "report": lambda: open_page(chromium, args.report, work)}, args.repeats)
    result = {"report": str(args.report), "bytes": args.report.stat().st_size, "repeats": args.repeats,
              "seconds": med, "report_minus_blank_s": round(med["report"] - med["blank"], 3),
              "report_over_blank": round(med["report"] / med["blank"], 3)}
    print(f"blank {med['blank']:.2f} s, report {med['report']:.2f} s (median of {args.repeats}): "
          f"report_minus_blank_s {result['report_minus_blank_s']:.2f}, report_over_blank "
          f"{result['report_over_blank']:.2f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
