"""What the Prefect training flow costs when nothing changed, as a ratio against the peer measured in the same
run: `dvc repro` with nothing to do (DVC's own checks of every stage), interleaved.

Run it in a checkout where the pipeline has run (`make run`) and one flow run has registered the model
(`detflow flow run`), so that a further flow run skips every stage and promotes nothing:

    python bench/flow_rerun.py --repeats 3

Prints the median seconds of each arm and ``flow_over_dvc_repro``; writes bench/results/flow_rerun.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from timing import interleaved, write_result


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/flow_rerun.json"))
    args = ap.parse_args(argv)
    arms = {"dvc_repro": [sys.executable, "-m", "dvc", "repro"],
            "flow": [sys.executable, "-m", "pipeline.cli", "flow", "run", "--repo", str(args.repo)]}
    # the warm-up pass also makes the flow's first promotion, if any
    med = interleaved({name: lambda cmd=cmd: run(cmd, args.repo) for name, cmd in arms.items()}, args.repeats)
    result = {"repeats": args.repeats, "seconds": med,
              "flow_over_dvc_repro": round(med["flow"] / med["dvc_repro"], 3)}
    print(f"dvc repro (no-op) {med['dvc_repro']:.2f} s, flow run (no-op) {med['flow']:.2f} s (median of "
          f"{args.repeats}): flow_over_dvc_repro {result['flow_over_dvc_repro']:.2f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
