"""Plot the communication benchmark: bytes per round against accuracy vs no compression.

    python benchmarks/plot_communication.py results/communication_adult.json \
        results/communication_digits.json --out docs/communication.png

Each uniform default (hollow marker) has an arrow to L-GreCo budgeted against it (filled
marker, bytes including its tables); the star is no compression. Accuracy is the paired
difference to no compression on the same seed (points), mean over seeds, bars from the
smallest to the largest; the dashed line is the 1-point target. Needs ``fedlowrank[plot]``
(matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))  # experiment_summary's paired intervals

FAMILY_COLOURS = {"powersgd": "tab:blue", "topk": "tab:orange", "qsgd": "tab:green", "sq": "tab:purple"}


def settings_of(paths: list[Path]) -> dict[str, dict]:
    """``{setting: combined figures}`` from one or more benchmark reports."""
    out: dict[str, dict] = {}
    for path in paths:
        report = json.loads(path.read_text())
        for name, setting in report["settings"].items():
            out[name] = setting["combined"]
    if not out:
        raise ValueError(f"no settings in {[str(p) for p in paths]}")
    return out


def plot(settings: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for ax, (name, combined) in zip(axes[0], settings.items()):
        def point(method):
            s = combined[method]
            gap = s["accuracy_gap_vs_none"]
            return s["bytes_per_round"]["mean"], 100 * gap["mean"], 100 * gap["min"], 100 * gap["max"]

        if "none" in combined:
            x, y, lo, hi = point("none")
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="*", color="black", ms=14, label="no compression")
        for method in combined:
            if not method.startswith("uniform:"):
                continue
            default = method.split(":", 1)[1]
            colour = FAMILY_COLOURS.get(default.split(":")[0], "grey")
            ux, uy, ulo, uhi = point(method)
            ax.errorbar([ux], [uy], yerr=[[uy - ulo], [uhi - uy]], fmt="o", mfc="white", color=colour, ms=8)
            ax.annotate(default, (ux, uy), textcoords="offset points", xytext=(5, 5), fontsize=8, color=colour)
            if f"lgreco:{default}" in combined:
                lx, ly, llo, lhi = point(f"lgreco:{default}")
                ax.errorbar([lx], [ly], yerr=[[ly - llo], [lhi - ly]], fmt="o", color=colour, ms=8)
                ax.annotate("", (lx, ly), (ux, uy), arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.6})
        ax.axhline(-1.0, color="grey", ls="--", lw=1)
        _style(ax, "bytes sent per round, all clients (log)", "final accuracy minus no compression (points)",
               f"{name}: uniform (hollow) -> L-GreCo (filled)")
    _save(fig, out)


def _style(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both: fewer bytes and higher accuracy."""
    front = []
    for i, (bytes_i, acc_i) in enumerate(points):
        dominated = any(
            (b <= bytes_i and a >= acc_i) and (b < bytes_i or a > acc_i) for j, (b, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(settings: dict[str, dict], out: Path) -> None:
    """Every method's bytes per round (tables included) against its final accuracy, front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for ax, (name, combined) in zip(axes[0], settings.items()):
        methods = [m for m in combined if m != "headroom" and "bytes_per_round" in combined[m]]
        points = [(combined[m]["bytes_per_round"]["mean"], 100 * combined[m]["accuracy_gap_vs_none"]["mean"]) for m in methods]
        for method, (x, y) in zip(methods, points):
            family = method.split(":")[1] if method.startswith(("uniform:", "lgreco:")) else "none"
            colour = FAMILY_COLOURS.get(family, "black")
            marker = "s" if method.startswith("lgreco:") else ("*" if method == "none" else "o")
            ax.plot([x], [y], marker, color=colour, ms=9 if marker != "*" else 13, mfc=colour if marker != "o" else "white")
            ax.annotate(method.replace("uniform:", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="grey", lw=1, label="Pareto front")
        _style(ax, "bytes sent per round, all clients, tables included (log)",
               "final accuracy minus no compression (points, paired)", f"{name}: uniform (hollow), L-GreCo (squares)")
    _save(fig, out)


def markdown_table(path: Path, versus: str) -> str:
    """Per method: bytes per round (tables counted), accuracy against no compression and
    against ``versus``, as paired 95% t-intervals over the report's seeds (points)."""
    from experiment_summary import t_interval

    report = json.loads(path.read_text())
    lines = []
    for name, setting in report["settings"].items():
        seeds = setting["per_seed"]
        lines += [f"{name}: {len(seeds)} paired seeds, {setting['rounds']} rounds.", "",
                  f"| method | bytes / round | of which tables | accuracy vs none (points, paired 95% CI) | vs {versus} | measured error |",
                  "|---|---:|---:|---|---|---:|"]
        for method in seeds[0]:
            rows = [seed[method] for seed in seeds]
            sent = sum(r["bytes_per_round"] for r in rows) / len(rows)
            tables = sent - sum(r["bytes_per_round_without_tables"] for r in rows) / len(rows)
            cells = []
            for other in ("none", versus):
                diff = [100 * (r["final_accuracy"] - seed[other]["final_accuracy"]) for r, seed in zip(rows, seeds)]
                if method == other:
                    cells.append("reference")
                    continue
                mean, lo, hi = t_interval(np.array(diff))
                cells.append(f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            error = sum(r["measured_error"] for r in rows) / len(rows)
            lines.append(f"| {method} | {sent:,.0f} | {tables:,.0f} | {cells[0]} | {cells[1]} | {error:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="benchmarks/communication.py --out files")
    parser.add_argument("--out", type=Path, default=Path("results/communication.png"))
    parser.add_argument("--pareto", action="store_true", help="every method on one bytes-accuracy plane, with the front")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write a table with paired intervals (first report) to this file")
    parser.add_argument("--versus", default="uniform:sq:3", help="second reference of the table's paired differences")
    args = parser.parse_args()
    (plot_pareto if args.pareto else plot)(settings_of(args.reports), args.out)
    print(f"written {args.out}")
    if args.markdown:
        args.markdown.write_text(markdown_table(args.reports[0], args.versus))
        print(f"written {args.markdown}")


if __name__ == "__main__":
    main()
