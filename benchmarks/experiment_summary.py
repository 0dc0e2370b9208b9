"""Paired summaries of ``benchmarks/experiment.py`` results: intervals, headroom, curves.

For every rule and seed: the final-round metric, the rounds and bytes to 90% of the
headroom (frozen base -> central fine-tuning of the same adapters; with G = 2 rows of S in
per-group settings), and the paired
difference against a reference rule on the same seed, with its 95% t-interval, how many
seeds agree, and a two-sided sign test. A run that never reaches 90% of the headroom
counts as ``rounds + 1`` rounds in the paired difference (censored) and is reported as such.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def t_interval(diffs: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def sign_test(diffs: np.ndarray) -> float:
    """Two-sided sign test p-value (ties dropped)."""
    from scipy import stats

    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def primary_metric(results: dict) -> str:
    first = next(iter(results["seeds"].values()))
    curve = next(iter(first["runs"].values()))
    return "auc" if "auc" in curve[0] else "acc"


def per_seed(results: dict, rule: str, metric: str) -> dict:
    """Final value, base, central, rounds and bytes to 90% headroom per seed."""
    rounds = results["regime"]["rounds"]
    out = {}
    for seed, data in results["seeds"].items():
        curve = data["runs"][rule]
        base = curve[0][metric]
        # The ceiling: central fine-tuning with per-group S where the setting has groups
        # (what FairLoRA can reach), else the plain adapters.
        top = data["central"].get("G2", data["central"]["G1"])[metric]
        target = base + 0.9 * (top - base)
        reached = next((p["round"] for p in curve if p["round"] > 0 and p[metric] >= target), None)
        spent = np.cumsum([p["bytes"] for p in curve])
        out[seed] = {
            "final": curve[-1][metric],
            "base": base,
            "central": top,
            "central_g1": data["central"]["G1"][metric],
            "central_g2": data["central"].get("G2", {}).get(metric),
            "rounds90": reached,
            "rounds90_censored": reached if reached is not None else rounds + 1,
            "bytes90": float(spent[reached]) if reached is not None else None,
            "norm": curve[-1]["product_norm_max"],
            "norm_peak": max(p["product_norm_max"] for p in curve),
            "worst": curve[-1].get("worst_group_auc"),
            "es_auc": curve[-1].get("es_auc"),
            "agg_error": agg_error_mean([p.get("agg_error") for p in curve]),
            # Diverged: a non-finite metric or norm in any round, clients refusing the global (an
            # entry above 1e6), or a final metric below the frozen base.
            "diverged": bool(
                any(not np.isfinite(p[metric]) or not np.isfinite(p["product_norm_max"]) or p.get("client_errors", 0)
                    for p in curve)
                or curve[-1][metric] < base
            ),
            "bytes_round": float(np.mean([p["bytes"] for p in curve[1:]])) if len(curve) > 1 else 0.0,
        }
    return out


def agg_error_mean(values) -> float | None:
    """Mean aggregation error over seeds; None for a rule that reports none (full-model FedAvg)."""
    finite = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(finite)) if finite else None


def summarise(results: dict, reference: str | None = None) -> dict:
    metric = primary_metric(results)
    rules = results["rules"]
    reference = reference if reference in rules else rules[0]
    seeds = sorted(results["seeds"], key=int)
    table = {rule: per_seed(results, rule, metric) for rule in rules}
    ref = table[reference]
    base = np.array([ref[s]["base"] for s in seeds])
    top = np.array([ref[s]["central"] for s in seeds])
    summary = {
        "metric": metric, "reference": reference, "seeds": len(seeds), "regime": results["regime"],
        "setting": results["setting"], "command": results.get("command", ""),
        "base": t_interval(base), "central": t_interval(top), "headroom": t_interval(top - base), "rules": {},
    }
    g2 = [ref[s]["central_g2"] for s in seeds]
    if all(v is not None for v in g2):
        summary["central_g2"] = t_interval(np.array(g2, dtype=float))
        summary["g2_minus_g1"] = t_interval(np.array(g2, dtype=float) - np.array([ref[s]["central_g1"] for s in seeds]))
    for rule in rules:
        rows = table[rule]
        final = np.array([rows[s]["final"] for s in seeds])
        entry = {
            "final": t_interval(final),
            "rounds90_reached": sum(rows[s]["rounds90"] is not None for s in seeds),
            "rounds90_median": float(np.median([rows[s]["rounds90_censored"] for s in seeds])),
            "bytes90_median": (float(np.median([rows[s]["bytes90"] for s in seeds if rows[s]["bytes90"] is not None]))
                               if any(rows[s]["bytes90"] is not None for s in seeds) else None),
            "bytes_round": float(np.mean([rows[s]["bytes_round"] for s in seeds])),
            "norm_final": float(np.mean([rows[s]["norm"] for s in seeds])),
            "norm_peak": float(np.max([rows[s]["norm_peak"] for s in seeds])),
            "agg_error": agg_error_mean([rows[s]["agg_error"] for s in seeds]),
            "diverged": sum(rows[s]["diverged"] for s in seeds),
        }
        for key in ("worst", "es_auc"):
            values = [rows[s][key] for s in seeds]
            if all(v is not None for v in values):
                entry[key] = t_interval(np.array(values, dtype=float))
        if rule != reference:
            diff = final - np.array([ref[s]["final"] for s in seeds])
            entry["vs_reference"] = {
                "diff": t_interval(diff), "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()),
                "sign_p": sign_test(diff),
                "rounds90_diff": t_interval(np.array([rows[s]["rounds90_censored"] - ref[s]["rounds90_censored"] for s in seeds], float)),
            }
            if "worst" in entry:
                wd = np.array([rows[s]["worst"] - ref[s]["worst"] for s in seeds])
                entry["vs_reference"]["worst_diff"] = t_interval(wd)
                entry["vs_reference"]["worst_wins"] = int((wd > 0).sum())
        summary["rules"][rule] = entry
    return summary


def _ci(t, scale=100.0, digits=2) -> str:
    mean, lo, hi = t
    if math.isnan(lo):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def _val(t, scale=100.0, digits=2) -> str:
    mean, lo, hi = t
    return f"{mean * scale:.{digits}f} ± {(hi - lo) / 2 * scale:.{digits}f}" if not math.isnan(lo) else f"{mean * scale:.{digits}f}"


def markdown(summary: dict, title: str, plot: str | None = None) -> str:
    m = summary["metric"].upper()
    lines = [f"### {title}", "", f"`{summary['command']}`", ""]
    lines.append(
        f"{summary['seeds']} paired seeds. {m} (x100, mean ± 95% half-width): frozen base {_val(summary['base'])}, "
        f"central fine-tuning{' with G = 2' if 'g2_minus_g1' in summary else ''} {_val(summary['central'])}, "
        f"**headroom {_ci(summary['headroom'])}**."
    )
    if "g2_minus_g1" in summary:
        lines[-1] += f" Central G = 2 minus G = 1: {_ci(summary['g2_minus_g1'])}."
    lines += ["", f"| rule | final {m} | vs {summary['reference']} (paired, 95% CI) | wins/losses | "
              "rounds to 90% (median; reached) | KB sent per round | KB to 90% (median) | product norm (final; peak) | agg. error | diverged |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rule, e in summary["rules"].items():
        vs = e.get("vs_reference")
        versus = _ci(vs["diff"]) if vs else "reference"
        wl = f"{vs['wins']}/{vs['losses']} (p={vs['sign_p']:.2g})" if vs else ""
        b90 = f"{e['bytes90_median'] / 1024:,.0f}" if e["bytes90_median"] is not None else "never"
        error = f"{e['agg_error']:.3f}" if e["agg_error"] is not None else "—"  # full-model FedAvg: none
        lines.append(
            f"| {rule} | {_val(e['final'])} | {versus} | {wl} | {e['rounds90_median']:g}; {e['rounds90_reached']}/{summary['seeds']} "
            f"| {e['bytes_round'] / 1024:,.1f} | {b90} | {e['norm_final']:.2f}; {e['norm_peak']:.2f} | {error} "
            f"| {e['diverged']}/{summary['seeds']} |"
        )
    if any("worst" in e for e in summary["rules"].values()):
        lines += ["", f"| rule | worst-group AUC | ES-AUC | worst-group vs {summary['reference']} | wins |", "|---|---:|---:|---:|---:|"]
        for rule, e in summary["rules"].items():
            vs = e.get("vs_reference", {})
            lines.append(f"| {rule} | {_val(e['worst'])} | {_val(e['es_auc'])} | "
                         f"{_ci(vs['worst_diff']) if 'worst_diff' in vs else 'reference'} | {vs.get('worst_wins', '')} |")
    if plot:
        lines += ["", f"![{title}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = primary_metric(results)
    seeds = sorted(results["seeds"], key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for rule in results["rules"]:
        curves = np.array([[p[metric] for p in results["seeds"][s]["runs"][rule]] for s in seeds])
        mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(seeds) > 1 else np.zeros(curves.shape[1])
        x = np.arange(curves.shape[1])
        ax.plot(x, mean, label=rule)
        ax.fill_between(x, mean - 1.96 * sd / math.sqrt(len(seeds)), mean + 1.96 * sd / math.sqrt(len(seeds)), alpha=0.2)
    top = np.mean([results["seeds"][s]["central"]["G1"][metric] for s in seeds])
    ax.axhline(top, color="k", ls="--", lw=1, label="central fine-tuning")
    if all("G2" in results["seeds"][s]["central"] for s in seeds):
        top2 = np.mean([results["seeds"][s]["central"]["G2"][metric] for s in seeds])
        ax.axhline(top2, color="k", ls=":", lw=1, label="central fine-tuning, G = 2")
    ax.set(xlabel="round", ylabel=f"{metric.upper()} (central test set)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged(paths: list[str], rules: list[str] | None = None) -> list[tuple[str, dict]]:
    """Files of the same setting and regime merged into one: their rules side by side, their seeds pooled.

    Runs are deterministic given the seed (same split, init, batches, sampling), so rules run
    in separate files on the same seed pair exactly as if run together, and blocks of seeds
    (0-9, 10-19, ...) pool into one paired comparison. Seeds on which some rule did not run
    are left out; a setting with no seed left is an error naming its files. ``rules``: only
    these (the others do not limit the seeds).
    """
    groups: dict[str, tuple[str, dict, list[str]]] = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        key = json.dumps([results["setting"], results["regime"]], sort_keys=True)
        if key not in groups:
            groups[key] = (path, results, [path])
            continue
        first = groups[key][1]
        groups[key][2].append(path)
        for seed, entry in results["seeds"].items():
            if seed in first["seeds"]:
                first["seeds"][seed]["runs"].update(entry["runs"])
            else:
                first["seeds"][seed] = entry
        first["rules"] += [r for r in results["rules"] if r not in first["rules"]]
        first["command"] = first.get("command", "") + "` and `" + results.get("command", "")
    out = []
    for name, results, files in groups.values():
        if rules:
            results["rules"] = [r for r in results["rules"] if r in rules]
            for entry in results["seeds"].values():
                entry["runs"] = {r: v for r, v in entry["runs"].items() if r in rules}
        complete = sorted((s for s, e in results["seeds"].items() if all(r in e["runs"] for r in results["rules"])), key=int)
        if not complete:
            raise SystemExit(f"{', '.join(files)}: no seed on which every rule ({', '.join(results['rules'])}) ran")
        results["seeds"] = {s: results["seeds"][s] for s in complete}
        out.append((name, results))
    return out


def summary_main(args) -> None:
    chunks = []
    from experiment import split_rules

    for name, results in merged(args.results, split_rules(args.rules) if getattr(args, "rules", "") else None):
        summary = summarise(results, args.reference)
        regime = results["regime"]
        label = (f"{results['setting']}: lr {regime['lr']:g}, {regime['local_epochs']} local epoch(s), init {regime['init']}, "
                 f"rank {regime['rank']}" + (f", client ranks {regime['client_ranks']}" if regime["client_ranks"] else "")
                 + (f", {regime['sites']} sites x {regime['fraction']:g} sampled" if regime["sites"] != 5 else ""))
        plot = None
        if args.plots:
            folder = Path(args.plots)
            folder.mkdir(parents=True, exist_ok=True)
            plot_path = folder / (Path(name).stem + ".png")
            plot_curves(results, plot_path, label)
            # Linked relative to the Markdown file, so the page renders where it is written.
            base = Path(args.markdown).resolve().parent if args.markdown else Path.cwd()
            plot = os.path.relpath(plot_path.resolve(), base)
        chunks.append(markdown(summary, label, plot))
        Path(name).with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(chunks)
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    else:
        print(text)


def setting_label(results: dict) -> str:
    """A short name for a setting and regime (``digits lr 0.001 E1 lora``, with sites or ranks where set)."""
    regime = results["regime"]
    label = f"{results['setting']} lr {regime['lr']:g} E{regime['local_epochs']} {regime['init']}"
    if regime["client_ranks"]:
        label += " ranks " + ",".join(map(str, regime["client_ranks"]))
    if regime["sites"] != 5:
        label += f" {regime['sites']} sites x {regime['fraction']:g}"
    return label


def finals(results: dict, rule: str, metric: str) -> np.ndarray:
    return np.array([results["seeds"][s]["runs"][rule][-1][metric] for s in sorted(results["seeds"], key=int)])


def leave_one_setting_out(settings: dict[str, dict], candidates: list[str], baselines: list[str]) -> list[dict]:
    """Choose a default without looking at the setting it is judged on.

    For each held-out setting ``h``, each candidate is scored by its worst mean paired
    difference to the best adapter baseline over every other setting (the baseline with the
    highest mean there); the best-scoring candidate is then judged on ``h`` alone: its paired
    difference to ``h``'s best baseline, with a 95% t-interval.
    """
    def gap(name: str, rule: str) -> np.ndarray:
        results = settings[name]
        metric = primary_metric(results)
        present = [b for b in baselines if b in next(iter(results["seeds"].values()))["runs"]]
        best = max(present, key=lambda b: float(np.mean(finals(results, b, metric))))
        return finals(results, rule, metric) - finals(results, best, metric), best

    rows = []
    for held in settings:
        scores = {c: min(float(np.mean(gap(s, c)[0])) for s in settings if s != held) for c in candidates}
        chosen = max(candidates, key=lambda c: scores[c])
        diffs, best = gap(held, chosen)
        mean, low, high = t_interval(diffs)
        rows.append({"held_out": held, "chosen": chosen, "score": scores[chosen], "baseline": best,
                     "diff": mean, "low": low, "high": high, "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum())})
    return rows


def loso_main(paths: list[str], candidates: list[str], baselines: list[str]) -> None:
    settings = {setting_label(results): results for _, results in merged(paths)}
    missing = [(name, rule) for name, results in settings.items() for rule in candidates
               if any(rule not in seed["runs"] for seed in results["seeds"].values())]
    if missing:
        raise SystemExit(f"candidates missing from settings: {missing[:5]}")
    print(f"Leave-one-setting-out over {len(settings)} settings; candidates {candidates}; baselines {baselines}\n")
    print("| held-out setting | chosen on the others (worst gap there) | best baseline here | chosen - baseline (x100, 95% CI) | wins/losses |")
    print("|---|---|---|---:|---:|")
    for row in leave_one_setting_out(settings, candidates, baselines):
        print(f"| {row['held_out']} | `{row['chosen']}` ({100 * row['score']:+.2f}) | {row['baseline']} | "
              f"{100 * row['diff']:+.2f} [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}] | {row['wins']}/{row['losses']} |")

