"""fedlowrank report: a Markdown or HTML report with PNG plots from the ServerApp's results files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlowrank.cli import main
from fedlowrank.cli.report import label_runs, load_results, Run

SHIM = Path(__file__).resolve().parents[1] / "simulations" / "plot_results.py"
PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = {"strategy": "fedlowrank", "rule": "exact", "rank": 4, "lr": 0.01, "local-epochs": 2,
          "num-server-rounds": 3, "compression": "none", "seed": 0, "results-file": ""}


def central(r: int, shift: float = 0.0) -> dict:
    return {"auc": 0.70 + 0.01 * r + shift, "acc": 0.80 + 0.001 * r, "auc_g0": 0.71 + shift, "auc_g1": 0.69,
            "es_auc": 0.68 + 0.01 * r, "dpd": 0.10 + 0.01 * r, "eod": 0.20, "n": 1000.0}


def write(path: Path, rounds: list[dict], config: dict | None = None, **top) -> Path:
    """A results file shaped as server_app.write_results writes it."""
    results = {"strategy": (config or CONFIG)["strategy"], "run_config": config or CONFIG, "num_sites": 3,
               "compression_allocations": {}, "seconds": 12.5, "rounds": rounds, **top}
    path.write_text(json.dumps(results, indent=1))
    return path


def plain_rounds(shift: float = 0.0) -> list[dict]:
    return [{"round": r, "central": central(r, shift), "clients_eval": {},
             "clients_train": {} if r == 0 else {"agg-clients-kept": 3, "agg-clients-dropped": 0}} for r in range(4)]


def pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def test_markdown_report_has_group_names_final_numbers_and_real_pngs(tmp_path, capsys):
    results = write(tmp_path / "run.json", plain_rounds(), group_names=["male", "female"])
    assert main(["report", str(results)]) == 0
    report = tmp_path / "run_report" / "report.md"  # the default folder, next to the file
    assert capsys.readouterr().out.strip() == str(report)
    text = report.read_text()
    assert text.startswith("# fedlowrank report")
    # One run: labelled by its main settings (rule: strategy fedlowrank reads it; no compression).
    label = "fedlowrank rank=4 rule=exact lr=0.01 local-epochs=2 num-server-rounds=3"
    assert label in text and "compression=" not in text
    assert "| AUC male | AUC female |" in text
    final = central(3)
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == [label, "central", "3"]
    assert cells[3:] == [f"{final[k]:.4f}" for k in ("auc", "acc", "auc_g0", "auc_g1", "es_auc", "dpd", "eod")]
    assert pngs(report.parent) == {"auc_acc.png", "group_auc.png", "es_auc.png", "fairness_gaps.png"}
    for name in pngs(report.parent):
        data = (report.parent / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
        assert f"]({name})" in text  # linked, relative to the report
    assert "bytes" not in text and "epsilon" not in text


def test_html_report_labels_runs_by_differing_config_and_adds_bytes_and_epsilon_plots(tmp_path):
    plain = write(tmp_path / "a.json", plain_rounds(), group_names=["non-White", "White"])
    rounds = plain_rounds(0.02)
    for r in rounds[1:]:
        r["clients_train"].update({"lgreco-bytes": 1000.0 * r["round"], "lgreco-bytes-per-client": [1, 2, 3],
                                   "dp_epsilon": 0.5 * r["round"]})
    other = write(tmp_path / "b.json", rounds, {**CONFIG, "rank": 8, "compression": "lgreco", "results-file": "b.json"},
                  group_names=["non-White", "White"])
    out = tmp_path / "html"
    assert main(["report", str(plain), str(other), "--out", str(out), "--format", "html"]) == 0
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # Differing keys label the runs; results-file differs too but is an output path, not a setting.
    assert "fedlowrank compression=none rank=4" in text and "fedlowrank compression=lgreco rank=8" in text
    assert "results-file=" not in text
    assert "AUC non-White" in text and "AUC White" in text
    assert pngs(out) == {"auc_acc.png", "group_auc.png", "es_auc.png", "fairness_gaps.png", "bytes.png", "epsilon.png"}
    assert all((out / name).read_bytes()[:8] == PNG for name in pngs(out))
    # Standalone: every figure embedded, none linked.
    assert text.count('src="data:image/png;base64,') == len(pngs(out)) and not any(f'src="{name}"' in text for name in pngs(out))
    # Final bytes 3,000 (6,000 over all rounds) and epsilon 1.50 for the DP run only.
    assert "<td class=\"num\">3,000</td>" in text and "6,000" in text and "1.50" in text


def test_federated_figures_and_fallback_group_names_when_the_file_has_neither(tmp_path):
    config = {**CONFIG, "central-evaluation": False}
    rounds = [{"round": r, "central": {},
               "clients_eval": {} if r == 0 else {"eval-auc": 0.6, "fed-auc": 0.75 + 0.01 * r, "fed-auc_g0": 0.74,
                                                  "fed-auc_g1": 0.73, "fed-es_auc": 0.7, "fed-dpd": 0.05, "fed-eod": 0.07},
               "clients_train": {}} for r in range(3)]
    out = tmp_path / "rep"
    assert main(["report", str(write(tmp_path / "fed.json", rounds, config)), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| AUC g0 | AUC g1 |" in text
    row = next(line for line in text.splitlines() if "| federated |" in line)
    assert "| 0.7700 |" in row  # fed- (federation-wide) wins over the sites' average eval-
    assert "acc" not in text.split("## Final round")[1].split("\n\n")[1]  # no accuracy column: not in the file


def test_identical_configurations_are_told_apart_by_file_name(tmp_path):
    a, b = write(tmp_path / "seed-a.json", plain_rounds()), write(tmp_path / "seed-b.json", plain_rounds())
    runs = [Run(p, load_results(p)) for p in (a, b)]
    assert label_runs(runs) == ["fedlowrank (seed-a)", "fedlowrank (seed-b)"]


@pytest.mark.parametrize("content, message", [
    ("not json {", "not a JSON results file"),
    (json.dumps({"strategy": "fedit", "rounds": []}), "no rounds"),
    (json.dumps([1, 2]), "not a results file"),
])
def test_a_bad_results_file_is_an_error_naming_it(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit, match=f"{bad}: {message}"):
        main(["report", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_simulations_shim_is_the_same_command(tmp_path):
    results = write(tmp_path / "run.json", plain_rounds())
    done = subprocess.run([sys.executable, str(SHIM), str(results), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "r" / "report.md")
    missing = subprocess.run([sys.executable, str(SHIM), str(tmp_path / "none.json")], capture_output=True, text=True)
    assert missing.returncode == 1 and f"{tmp_path / 'none.json'}: no such results file" in missing.stderr


def test_the_results_file_round_trips_and_older_files_still_read(tmp_path):
    from fedlowrank.results import RoundRecord, RunResults

    written = RunResults(strategy="fedlowrank", run_config={"rank": 4}, num_sites=5, group_names=["female", "male"],
                         seconds=1.5, rounds=[RoundRecord(0, {"auc": 0.5}), RoundRecord(1, {"auc": 0.7}, {}, {"train-loss": 0.3})])
    path = tmp_path / "run.json"
    written.write(path)
    assert RunResults.read(path) == written
    older = tmp_path / "older.json"  # before strategy, group_names and num_sites were written
    older.write_text('{"run_config": {"rank": 2}, "rounds": [{"round": 0, "central": {"auc": 0.6}}]}')
    read = RunResults.read(older)
    assert read.strategy is None and read.group_names == [] and read.rounds[0].clients_train == {}


def test_runs_of_different_apps_get_their_own_section_and_figures(tmp_path):
    adult = [write(tmp_path / f"adult{i}.json", plain_rounds(0.01 * i), {**CONFIG, "seed": i}, app="adult-married")
             for i in range(3)]
    imaging = write(tmp_path / "img.json", plain_rounds(), {**CONFIG, "image-size": 64}, app="fairlora-images")
    out = tmp_path / "mixed"
    assert main(["report", *map(str, adult), str(imaging), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "4 runs of 2 apps (adult-married, fairlora-images)" in text
    assert "## App adult-married" in text and "## App fairlora-images" in text
    assert {"adult-married-auc_acc.png", "fairlora-images-auc_acc.png"} <= pngs(out)
    # Within an app only what differs labels a run: the seed here, never the other app's image-size.
    adult_part = text.split("## App fairlora-images")[0]
    assert "fedlowrank seed=1" in adult_part and "image-size" not in adult_part


def test_labels_leave_out_settings_that_are_empty():
    runs = [Run(Path("a.json"), load_results_from({**CONFIG, "robust": ""})),
            Run(Path("b.json"), load_results_from({**CONFIG, "robust": "clip"}))]
    assert label_runs(runs) == ["fedlowrank", "fedlowrank robust=clip"]


def load_results_from(config):
    from fedlowrank.results import RunResults

    return RunResults(strategy="fedlowrank", run_config=config, rounds=[])


def test_a_failed_run_is_marked_failed_in_the_report_not_shown_as_a_result(tmp_path):
    cause = "no round kept a valid reply: every site failed: ModuleNotFoundError: No module named 'opacus'"
    good = write(tmp_path / "good.json", plain_rounds())
    failed = write(tmp_path / "failed.json", plain_rounds(), config={**CONFIG, "seed": 1}, failure=cause)
    assert load_results(failed).failure == cause and load_results(good).failure is None
    assert main(["report", str(good), str(failed), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in text.splitlines() if "[FAILED]" in line and line.startswith("|"))
    assert "seed=1" in row and cause in row
    assert sum("[FAILED]" in line for line in text.splitlines() if line.startswith("|")) == 1
