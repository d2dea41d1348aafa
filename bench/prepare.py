"""`detflow prepare` speed on BCCD, as a ratio against the floor measured in the same run: decoding every image of
the dataset once (what prepare cannot avoid), interleaved with full prepares so load drift hits both alike.

    DETFLOW_ASSETS=../shared python bench/prepare.py --repeats 3

Prints the median seconds of each arm and ``prepare_over_decode``; writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from timing import interleaved, write_result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="bccd", help="data.source: a named asset or a dataset folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prepare.json"))
    args = ap.parse_args(argv)

    from pipeline import assets
    from pipeline.data.imaging import decode_path
    from pipeline.data.prepare import prepare_dataset, resolve_source
    from pipeline.params import load_params

    params = load_params(None, [f"data.source={args.source}"])
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root, _, _ = resolve_source(params, Path(tmp) / "raw", None, Path("data/raw/phantom"))
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".dcm"})
        if not images:
            print(f"no images under {root}", file=sys.stderr)
            return 2

        def decode() -> None:
            for p in images:
                decode_path(p, max_pixels=None)

        def prepare(i: int) -> None:
            prepare_dataset(params, Path(tmp) / f"prepared{i}", Path(tmp) / f"report{i}.json",
                            raw_dir=Path(tmp) / "raw", progress=False)

        runs = iter(range(args.repeats + 1))
        med = interleaved({"decode": decode, "prepare": lambda: prepare(next(runs))}, args.repeats)
    result = {"source": args.source, "images": len(images), "repeats": args.repeats, "seconds": med,
              "prepare_over_decode": round(med["prepare"] / med["decode"], 3), "asset": args.source in assets.ASSETS}
    print(f"{len(images)} images: decode {med['decode']:.2f} s, prepare {med['prepare']:.2f} s (median of "
          f"{args.repeats}); prepare_over_decode: {result['prepare_over_decode']:.2f}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
