"""Publish finished convergence runs: copy the valid result files of a results folder's
table2/ (where `mtd-fast experiment table2 --out RESULTS` writes them) into
benches/figures/table2/, merge every file there into benches/figures/table2.{md,json} and
table2_curves.png (nothing is trained), and rewrite the README's table2 block from the new
table2.md (tests/test_readme.py checks that block verbatim). Each result file's rank file
(`NAME.ranks.npz`, the per-sample ranks behind the paired differences) goes with it.

    python benches/publish_table2.py --from /path/to/results [--figures benches/figures] [--readme README.md]

Corrupt or partial files are left where they are and listed, and so is a file that would
replace a published one made with another setting (a 3-epoch run over a converged one)
unless --force. The README's prose around the
block (what the runs show, which targets are missed and by how much) is still written by hand.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mtd_fast.experiments.table2 import publish

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", required=True, help="the --out folder of the table2 runs")
    ap.add_argument("--figures", default=str(ROOT / "benches" / "figures"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="'' to leave the README alone")
    ap.add_argument("--force", action="store_true",
                    help="replace a published file even when it was made with another setting (epochs cap, overrides)")
    args = ap.parse_args(argv)
    res = publish(Path(args.source), Path(args.figures), Path(args.readme) if args.readme else None, force=args.force)
    results = [n for n in res["copied"] if n.endswith(".json")]
    print(f"copied {len(results)} result files and {len(res['copied']) - len(results)} rank files: "
          f"{', '.join(res['copied']) or '-'}")
    for name, problem in res["skipped"].items():
        print(f"skipped {name}: {problem}")
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()) + (f" and {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
