"""Report on one or more simulation results files: a Markdown or HTML page with PNG plots.

    fedlowrank report results/adult_married-*.json [--out DIR] [--format md|html]
    python simulations/plot_results.py ...   (the same)

Writes ``report.md`` (or ``report.html``) and one PNG per metric into DIR (default:
``<first results file's stem>_report/`` next to it) and prints the report's path. Runs of one
app are drawn on the same axes, each labelled by its strategy and the run-config entries that
are set and differ between them; runs of different apps get a section and figures each. The
HTML page is standalone (its images embedded). Needs matplotlib (``pip install fedlowrank[plot]``).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..results import RoundRecord, RunResults

# Output paths, not settings: they differ between runs without making them different experiments.
BOOKKEEPING_KEYS = ("results-file", "save-adapter", "checkpoint-dir", "resume-from")
# A single run is labelled by these (``rule`` only where the strategy reads it).
MAIN_KEYS = ("rank", "rule", "lr", "local-epochs", "num-server-rounds", "compression")
FORMATS = ("md", "html")
GROUP_KEY = re.compile(r"auc_g(\d+)")  # per-group AUC; not xauc_g0_g1 nor the bin error bounds


@dataclass
class Run:
    """One results file, with the view of it the report draws.

    Attributes
    ----------
    path : pathlib.Path
        The results file.
    results : RunResults
        Its parsed content.
    label : str
        The run's name in legends and the table (set by :func:`label_runs`).
    """

    path: Path
    results: RunResults
    label: str = ""
    source: str = field(init=False)
    """``"central"`` (the server's pooled test rows) when any round has it, else ``"federated"``."""

    def __post_init__(self) -> None:
        has_central = any("auc" in r.central for r in self.results.rounds)
        self.source = "central" if has_central else "federated"

    @property
    def strategy(self) -> str:
        """The strategy's name (the file's stem for files that lack it)."""
        return str(self.results.strategy or self.results.run_config.get("strategy", self.path.stem))

    @property
    def app(self) -> str:
        """The app that ran, as the results file records it ("" for files that predate it)."""
        return str(self.results.app or "")

    @property
    def config(self) -> dict:
        """The run config the run used (empty for files that predate it)."""
        return dict(self.results.run_config)

    @property
    def group_names(self) -> list[str]:
        """Names for the ``_g0``, ``_g1``, ... metrics; ``g0``, ``g1`` for files that predate them."""
        given = list(self.results.group_names)
        count = max([len(given)] + [int(m.group(1)) + 1 for m in map(GROUP_KEY.fullmatch, self.metric_keys()) if m])
        return [given[g] if g < len(given) else f"g{g}" for g in range(count)]

    def figures(self, rnd: RoundRecord) -> dict:
        """Evaluation metrics of one round: central, or the federated ones the sites sent.

        Federated figures are the exact federation-wide ones (``fed-`` keys) where present,
        else the example-weighted average of the sites' own (``eval-`` keys).
        """
        if self.source == "central":
            return dict(rnd.central)
        merged = {}
        for prefix in ("eval-", "fed-"):  # fed- last: it wins
            merged.update({k[len(prefix):]: v for k, v in rnd.clients_eval.items() if k.startswith(prefix)})
        return merged

    def metric_keys(self) -> set[str]:
        """Every evaluation metric any round has (in the view :attr:`source` picks)."""
        return {k for r in self.results.rounds for k in self.figures(r)}

    def series(self, key: str, train: bool = False) -> tuple[list[int], list[float]]:
        """Rounds and values of an evaluation metric (or, with ``train``, a training metric)."""
        points = []
        for r in self.results.rounds:
            values = r.clients_train if train else self.figures(r)
            if is_number(values.get(key)):  # not lists such as lgreco-bytes-per-client
                points.append((r.round, float(values[key])))
        return [p[0] for p in points], [p[1] for p in points]

    def bytes_key(self) -> str | None:
        """The training metric that counts bytes sent: ``lgreco-bytes``, else any ``*bytes*`` key."""
        keys = {k for r in self.results.rounds for k, v in r.clients_train.items() if is_number(v)}
        if "lgreco-bytes" in keys:
            return "lgreco-bytes"
        return min((k for k in keys if "bytes" in k), default=None)

    def has_epsilon(self) -> bool:
        """Whether the sites trained with DP: ``dp_epsilon``, the worst site's spend, is there."""
        return any("dp_epsilon" in r.clients_train for r in self.results.rounds)

    def final(self) -> dict:
        """The last round: its number, evaluation figures and training metrics."""
        last = max(self.results.rounds, key=lambda r: r.round)
        return {"round": last.round, "eval": self.figures(last), "train": dict(last.clients_train)}


def is_number(value) -> bool:
    """A metric value that can be plotted (JSON numbers, NaN included; not lists or booleans)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_results(path: Path) -> RunResults:
    """A results file written by the ServerApp (:meth:`fedlowrank.results.RunResults.read`)."""
    return RunResults.read(path)


def show_value(value) -> str:
    """Run-config values as they are written in ``--run-config`` (strings unquoted)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def label_runs(runs: list[Run]) -> list[str]:
    """Each run's label: its strategy plus what sets it apart from the other runs.

    With several runs, the run-config entries that differ between them; with one, its main
    settings (:data:`MAIN_KEYS`). Runs still alike (e.g. the same configuration twice) get
    their file's stem, so no two labels collide.
    """
    def entries(run: Run, keys) -> list[str]:
        config = run.config
        shown = []
        for key in keys:
            if key not in config or key in ("strategy", *BOOKKEEPING_KEYS) or show_value(config[key]) == "":
                continue  # unset, bookkeeping, or empty (robust='' says nothing in a label)
            if key == "rule" and run.strategy != "fedlowrank" and len(runs) == 1:
                continue  # only strategy 'fedlowrank' reads the rule
            if key == "compression" and len(runs) == 1 and show_value(config[key]) in ("", "none"):
                continue
            shown.append(f"{key}={show_value(config[key])}")
        return shown

    if len(runs) == 1:
        labels = [" ".join([runs[0].strategy, *entries(runs[0], MAIN_KEYS)])]
    else:
        # A setting that differs between runs labels only the runs that depart from its usual value
        # (said once, in the report's text): "fedlowrank compression=lgreco", not "compression=none" on every run.
        usual = usual_settings(runs)
        labels = [" ".join([run.strategy, *entries(run, [k for k in sorted(run.config) if k in usual and
                                                          json.dumps(run.config.get(k), sort_keys=True) != usual[k]])])
                  for run in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({run.path.stem})" for label, run in zip(labels, runs)]
    return [f"{label} [FAILED]" if run.results.failure else label for label, run in zip(labels, runs)]


def usual_settings(runs: list[Run]) -> dict[str, str | None]:
    """Each run-config key whose value differs between runs, with the value more than half the
    runs share (JSON), or None where no value has a majority (then every run shows its own)."""
    from collections import Counter

    out: dict[str, str | None] = {}
    for key in sorted({k for run in runs for k in run.config}):
        values = Counter(json.dumps(run.config.get(key), sort_keys=True) for run in runs)
        if len(values) > 1:
            value, count = values.most_common(1)[0]
            out[key] = value if 2 * count > len(runs) else None
    return out


def shared_settings(runs: list[Run]) -> list[str]:
    """The main settings every run has in common (said once, not in every label)."""
    if len(runs) < 2:
        return []
    shown = []
    for key in ("strategy", *MAIN_KEYS, "num-sites", "seed"):
        if key == "rule" and any(run.strategy != "fedlowrank" for run in runs):
            continue  # only strategy 'fedlowrank' reads the rule
        values = {json.dumps(run.config.get(key), sort_keys=True) for run in runs}
        if len(values) == 1 and key in runs[0].config:
            shown.append(f"{key}={show_value(runs[0].config[key])}")
    return shown


@dataclass
class Plot:
    """One PNG of the report: its file name and caption."""

    name: str
    title: str


def draw(runs: list[Run], out: Path, prefix: str = "") -> list[Plot]:
    """Write the PNGs (named ``<prefix><metric>.png``) for the metrics present in at least one run;
    return them in order. Legends sit beside the axes, never over the data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Up to 10 runs: matplotlib's default colours; more: 20 colours and a marker per block of 20.
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else [plt.get_cmap("tab20")(i) for i in range(20)]
    colors = [palette[i % len(palette)] for i in range(len(runs))]
    markers = [("o", "s", "^", "D")[(i // len(palette)) % 4] for i in range(len(runs))]
    federated = {run.label: f"{run.label} [federated]" if run.source == "federated" else run.label for run in runs}
    plots: list[Plot] = []

    def save(fig, name: str, title: str) -> None:
        for ax in fig.axes:
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
            ax.grid(alpha=0.3)
        # One legend beside the last axes (the runs are the same on every axes), outside the data.
        handles, labels = fig.axes[-1].get_legend_handles_labels()
        if handles:
            fig.axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                borderaxespad=0.0, ncol=1 if len(labels) <= 24 else 2)
        fig.savefig(out / (prefix + name), dpi=120, bbox_inches="tight")  # the legend and titles whole
        plt.close(fig)
        plots.append(Plot(prefix + name, title))

    def line(ax, points: tuple[list[int], list[float]], *style, **kwargs) -> None:
        if points[0]:  # a run without the metric stays out of the legend
            ax.plot(*points, *style, **kwargs)

    def present(key: str) -> bool:
        return any(key in run.metric_keys() for run in runs)

    # AUC and accuracy, each on its own axes when both are there.
    keys = [k for k in ("auc", "acc") if present(k)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for run, color, marker in zip(runs, colors, markers):
                line(ax, run.series(key), marker=marker, color=color, label=federated[run.label])
            ax.set(ylabel="AUC" if key == "auc" else "accuracy", title="AUC" if key == "auc" else "Accuracy")
        save(fig, "auc_acc.png", "AUC and accuracy per round")

    if any(GROUP_KEY.fullmatch(k) for run in runs for k in run.metric_keys()):
        fig, ax = plt.subplots(figsize=(7, 4))
        styles = ["-", "--", ":", "-."]
        names = runs[0].group_names
        for run, color, marker in zip(runs, colors, markers):
            for g, name in enumerate(run.group_names):
                # One legend entry per run (its colour); the line style names the group, in the title.
                label = federated[run.label] if g == 0 else None
                line(ax, run.series(f"auc_g{g}"), styles[g % len(styles)], marker=marker, markersize=3, color=color, label=label)
        legend = ", ".join(f"{name} {('solid', 'dashed', 'dotted', 'dash-dot')[g % 4]}" for g, name in enumerate(names))
        ax.set(ylabel="AUC", title=f"AUC per group ({legend})")
        save(fig, "group_auc.png", "AUC per group per round")

    if present("es_auc"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color, marker in zip(runs, colors, markers):
            line(ax, run.series("es_auc"), marker=marker, color=color, label=federated[run.label])
        ax.set(ylabel="ES-AUC", title="Equity-scaled AUC")
        save(fig, "es_auc.png", "Equity-scaled AUC (ES-AUC) per round")

    if present("dpd") or present("eod"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color, marker in zip(runs, colors, markers):
            line(ax, run.series("dpd"), marker=marker, color=color, label=federated[run.label])
            line(ax, run.series("eod"), "--", marker=marker, markersize=3, color=color)
        ax.set(ylabel="difference", title="DPD (solid) and EOD (dashed)")
        save(fig, "fairness_gaps.png", "Demographic parity and equalized odds differences per round")

    if any(run.bytes_key() for run in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color, marker in zip(runs, colors, markers):
            if run.bytes_key():
                line(ax, run.series(run.bytes_key(), train=True), marker=marker, color=color,
                        label=f"{run.label} ({run.bytes_key()})")
        ax.set(ylabel="bytes", title="Bytes sent per round")
        save(fig, "bytes.png", "Bytes sent per round")

    if any(run.has_epsilon() for run in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color, marker in zip(runs, colors, markers):
            if run.has_epsilon():
                line(ax, run.series("dp_epsilon", train=True), marker=marker, color=color, label=run.label)
        ax.set(ylabel="epsilon", title="DP epsilon (worst site)")
        save(fig, "epsilon.png", "Differential-privacy epsilon spent per round (worst site)")
    return plots


def number(value, digits: int = 4) -> str:
    """A table cell: the value to ``digits`` decimals, ``nan`` if undefined, ``–`` if absent."""
    if value is None:
        return "–"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def final_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final-round table; columns only for metrics some run has."""
    finals = [run.final() for run in runs]
    names = {tuple(run.group_names) for run in runs}
    # One set of group names for all runs goes in the header; otherwise in every cell.
    common = next(iter(names)) if len(names) == 1 else None
    columns: list[tuple[str, Callable[[Run, dict], str]]] = [
        ("run", lambda run, f: run.label),
        ("evaluated on", lambda run, f: run.source),
        ("round", lambda run, f: str(f["round"])),
    ]
    for key, title in (("auc", "AUC"), ("acc", "accuracy")):
        columns.append((title, lambda run, f, key=key: number(f["eval"].get(key))))
    groups = max(len(run.group_names) for run in runs)
    for g in range(groups):
        title = f"AUC {common[g]}" if common else f"AUC group {g}"

        def cell(run, f, g=g):
            value = number(f["eval"].get(f"auc_g{g}"))
            return value if common or g >= len(run.group_names) else f"{value} ({run.group_names[g]})"

        columns.append((title, cell))
    for key, title in (("es_auc", "ES-AUC"), ("dpd", "DPD"), ("eod", "EOD")):
        columns.append((title, lambda run, f, key=key: number(f["eval"].get(key))))
    columns.append(("bytes, last round", lambda run, f: f"{int(f['train'][run.bytes_key()]):,}"
                    if is_number(f["train"].get(run.bytes_key())) else "–"))
    columns.append(("bytes, all rounds", lambda run, f: f"{int(sum(run.series(run.bytes_key(), train=True)[1])):,}"
                    if run.bytes_key() else "–"))
    columns.append(("epsilon", lambda run, f: number(f["train"].get("dp_epsilon"), 2)))
    columns.append(("failed", lambda run, f: run.results.failure or "–"))  # its figures are the untouched base's
    cells = [[fn(run, f) for _, fn in columns] for run, f in zip(runs, finals)]
    # Drop metric columns no run has (the first three always stay).
    keep = [i for i in range(len(columns)) if i < 3 or any(row[i] != "–" for row in cells)]
    return [columns[i][0] for i in keep], [[row[i] for i in keep] for row in cells]


def describe(runs: list[Run], plots: list[Plot], app: str | None = None) -> list[tuple]:
    """The report's content on one app's runs as blocks, rendered to Markdown or HTML by
    :func:`render`; under an ``app`` heading (one level down) when the report has several."""
    blocks: list[tuple] = [("h2", f"App {app or '(not recorded)'}")] if app is not None else []
    count = f"{len(runs)} run" + ("s" if len(runs) > 1 else "")
    text = f"{count}. Evaluation metrics are the server's central evaluation on the pooled test rows"
    if any(run.source == "federated" for run in runs):
        text += (" where the results have it, else the federated figures (the sites' own test rows, merged;"
                 " marked [federated] in the plots)")
    blocks.append(("p", text + "."))
    shared = shared_settings(runs)
    if shared:
        blocks.append(("p", "Shared settings: " + ", ".join(shared) + "."))
    usual = {k: v for k, v in usual_settings(runs).items() if v is not None and k not in ("strategy", "seed", *BOOKKEEPING_KEYS)}
    shown = [f"{k}={show_value(json.loads(v))}" for k, v in usual.items() if json.loads(v) not in (None, "")]
    if len(runs) > 1 and shown:
        blocks.append(("p", "Unless a run's label says otherwise: " + ", ".join(shown) + "."))
    items = []
    for run in runs:
        seconds = run.results.seconds
        extra = [f"{len(run.results.rounds)} rounds recorded", f"groups {', '.join(run.group_names)}"]
        if run.results.num_sites is not None:
            extra.append(f"{run.results.num_sites} sites")
        if seconds is not None:
            extra.append(f"{float(seconds):.0f} s")
        items.append((run.label, f"{run.path} ({'; '.join(extra)})"))
    sub = "h3" if app is not None else "h2"
    blocks.append((sub, "Runs"))
    blocks.append(("list", items))
    blocks.append((sub, "Final round"))
    blocks.append(("table", *final_table(runs)))
    if plots:
        blocks.append((sub, "Per round"))
        blocks += [("image", plot.title, plot.name) for plot in plots]
    return blocks


def by_app(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by the app that ran them, in the order given (each app's metrics, data and
    groups are its own: drawing an Adult run beside an imaging run compares nothing)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.app, []).append(run)
    return groups


def md_cell(text: str) -> str:
    """Text that cannot break a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(blocks: list[tuple], fmt: str, folder: Path | None = None) -> str:
    """Markdown (images as relative links), or a standalone HTML page (images embedded, read
    from ``folder``), from :func:`describe`'s blocks."""
    lines: list[str] = []
    if fmt == "md":
        for kind, *rest in blocks:
            if kind in ("h1", "h2", "h3"):
                lines += [f"{'#' * int(kind[1])} {rest[0]}", ""]
            elif kind == "p":
                lines += [rest[0], ""]
            elif kind == "list":
                lines += [f"- **{md_cell(name)}**: {md_cell(text)}" for name, text in rest[0]] + [""]
            elif kind == "table":
                header, rows = rest
                lines.append("| " + " | ".join(map(md_cell, header)) + " |")
                lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
                lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in rows]
                lines.append("")
            elif kind == "image":
                lines += [f"**{rest[0]}**", "", f"![{rest[0]}]({rest[1]})", ""]
        return "\n".join(lines)
    esc = html.escape
    title = next(rest[0] for kind, *rest in blocks if kind == "h1")
    lines += ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
              "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em}"
              "td.num{text-align:right}img{max-width:100%}</style>", "</head>", "<body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            lines.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "p":
            lines.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "list":
            lines.append("<ul>" + "".join(f"<li><b>{esc(name)}</b>: {esc(text)}</li>" for name, text in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            lines.append("<table>")
            lines.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                lines.append("<tr>" + "".join(f"<td>{esc(c)}</td>" if i < 2 else f'<td class="num">{esc(c)}</td>'
                                              for i, c in enumerate(row)) + "</tr>")
            lines.append("</table>")
        elif kind == "image":
            source = esc(rest[1], quote=True)
            if folder is not None and (folder / rest[1]).exists():  # embedded: the page stands alone
                source = "data:image/png;base64," + base64.b64encode((folder / rest[1]).read_bytes()).decode()
            lines.append(f"<h4>{esc(rest[0])}</h4>")
            lines.append(f'<img src="{source}" alt="{esc(rest[0], quote=True)}">')
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def write_report(paths: list[Path], out: Path | None = None, fmt: str = "md") -> Path:
    """Write the report on ``paths`` into ``out`` and return the report file's path.

    Parameters
    ----------
    paths : list of pathlib.Path
        Results files written by the ServerApp; several are drawn on the same axes.
    out : pathlib.Path, optional
        The report's folder (created); default ``<first file's stem>_report`` next to it.
    fmt : {"md", "html"} (default: "md")
        ``report.md`` (the PNGs as relative links) or a standalone ``report.html`` (embedded).

    Returns
    -------
    pathlib.Path
        ``out / "report.md"`` or ``out / "report.html"``.

    Raises
    ------
    ValueError
        Naming the file, for a results file that is missing, not JSON or has no rounds; or
        for an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if not paths:
        raise ValueError("no results file given")
    runs = [Run(Path(p), load_results(Path(p))) for p in paths]
    out = Path(out) if out is not None else runs[0].path.with_name(f"{runs[0].path.stem}_report")
    out.mkdir(parents=True, exist_ok=True)
    apps = by_app(runs)
    count = f"{len(runs)} run" + ("s" if len(runs) > 1 else "")
    blocks: list[tuple] = [("h1", "fedlowrank report")]
    if len(apps) > 1:
        blocks.append(("p", f"{count} of {len(apps)} apps ({', '.join(apps)}), each drawn on its own figures."))
    for app, app_runs in apps.items():
        for run, label in zip(app_runs, label_runs(app_runs)):
            run.label = label
        several = len(apps) > 1
        plots = draw(app_runs, out, prefix=f"{app or 'app'}-" if several else "")
        blocks += describe(app_runs, plots, app if several else None)
    report = out / f"report.{fmt}"
    report.write_text(render(blocks, fmt, out))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlowrank report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results files written by the ServerApp")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the report and its PNGs (default: <first results stem>_report/ next to it)")
    parser.add_argument("--format", choices=FORMATS, default="md", help="report.md (default) or a standalone report.html")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fedlowrank report needs matplotlib: pip install 'fedlowrank[plot]'") from None
    try:
        report = write_report(args.results, args.out, args.format)
    except ValueError as err:
        raise SystemExit(f"fedlowrank report: {err}") from None
    print(report)
    return 0
