"""What the robust option costs on clean runs: paired seeds, robust off vs on, via flwr run.

    python benchmarks/robust_cost.py --seeds 10 --out results/robust_cost.json

Every seed runs the adult_married app twice (same split, same init: only ``robust``
differs) on a local SuperLink (``simulations/run.py``), 5 sites, 8 rounds, and compares the
final central AUC. Prints the paired differences, their mean with a 95% t-interval, and
how many seeds agree in sign.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedlowrank.results import RunResults

ROOT = Path(__file__).resolve().parents[1]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
       12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 29: 2.05}


def t95(df: int) -> float:
    """Two-sided 95% Student t quantile (table; 1.96 beyond it)."""
    return T95.get(df, T95[max(k for k in T95 if k <= df)] if df < 30 else 1.96)


def final_auc(seed: int, robust: str, rounds: int, sites: int, workdir: Path) -> float:
    out = workdir / f"seed{seed}-{robust or 'off'}.json"
    config = f"num-server-rounds={rounds} seed={seed} robust='{robust}' results-file='{out}'"
    done = subprocess.run([sys.executable, str(ROOT / "simulations" / "run.py"), "adult-married", "--supernodes", str(sites),
                           "--run-config", config], capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed} robust={robust!r} failed:\n{done.stdout[-2000:]}")
    return float(RunResults.read(out).rounds[-1].central["auc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--robust", default="clip", choices=["clip", "reject"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            off = final_auc(seed, "", args.rounds, args.sites, Path(tmp))
            on = final_auc(seed, args.robust, args.rounds, args.sites, Path(tmp))
            rows.append({"seed": seed, "off": off, "on": on, "diff": on - off})
            print(f"seed {seed}: AUC off {off:.4f}, {args.robust} {on:.4f}, diff {on - off:+.4f}", flush=True)
    diffs = [r["diff"] for r in rows]
    mean = statistics.fmean(diffs)
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    agree = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    print(f"paired AUC difference ({args.robust} - off), {len(diffs)} seeds: {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
          f" (95% t-interval); higher on {agree[0]}, lower on {agree[1]}, equal on {len(diffs) - sum(agree)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "mean": mean, "half_width": half}, indent=1))


if __name__ == "__main__":
    main()
