"""Plot a simulation's results file: AUC per round, overall and per group, and fairness gaps.

    fedlowrank report results/adult_married.json [more.json ...] --out results/adult_married.png
    python simulations/plot_results.py ...   (the same)

Several files (e.g. one per strategy) are drawn on the same axes, labelled by strategy.
Needs matplotlib (``pip install fedlowrank[plot]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(results: dict, source: str, key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key`` in ``source`` ("central" or "clients_eval")."""
    points = [(r["round"], r[source][key]) for r in results["rounds"] if key in r.get(source, {})]
    return [p[0] for p in points], [p[1] for p in points]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlowrank report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the first results file)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.results:
        results = json.loads(path.read_text())
        label = results.get("strategy", path.stem)
        line = ax_auc.plot(*series(results, "central", "auc"), marker="o", label=f"{label}: all")[0]
        for group, style in (("auc_g0", "--"), ("auc_g1", ":")):
            ax_auc.plot(*series(results, "central", group), style, color=line.get_color(), label=f"{label}: {group[-2:]}")
        ax_gap.plot(*series(results, "central", "dpd"), marker="o", color=line.get_color(), label=f"{label}: DPD")
        ax_gap.plot(*series(results, "central", "eod"), "--", color=line.get_color(), label=f"{label}: EOD")
    ax_auc.set(xlabel="round", ylabel="AUC (pooled test rows)", title="AUC overall and per group (g0, g1)")
    ax_gap.set(xlabel="round", ylabel="difference", title="Demographic parity / equalized odds")
    for ax in (ax_auc, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.results[0].with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")

