"""The communication benchmark runs end to end and counts what travelled (2 rounds, 1 seed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_communication_benchmark_smoke(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [
        sys.executable, "benchmarks/communication.py", "--settings", "adult", "--seeds", "0", "--rounds", "2",
        "--methods", "none,uniform:sq:3,lgreco:sq:3", "--reallocate-every", "1", "--final-window", "1",
        "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["settings"]["adult"]["runs"]["0"]
    # Uncompressed: every site sends every exchanged float32 array, every round.
    import communication  # noqa: PLC0415  (benchmarks/ is on sys.path: tests/conftest.py)

    _, sites, _, make, *_ = communication.adult_setting(2, 0)
    initial = make("none")[1]
    raw = sum(int(a.numpy().nbytes) for a in initial.values())
    assert {r["bytes"] for r in runs["none"]["rounds"]} == {sites * raw}
    # Uniform asks for no tables; L-GreCo asks in both allocation rounds and its tables travel.
    assert all(r["table_bytes"] == 0 for r in runs["uniform:sq:3"]["rounds"])
    # Tables travel in the allocation rounds (at least the first; none after a uniform fallback).
    assert runs["lgreco:sq:3"]["rounds"][0]["table_bytes"] > 0
    assert runs["uniform:sq:3"]["rounds"][0]["bytes"] < runs["none"]["rounds"][0]["bytes"] / 5
    # On the wire too: the update is two arrays, so .npy headers do not eat the saving.
    assert runs["uniform:sq:3"]["rounds"][0]["serialized_bytes"] < runs["none"]["rounds"][0]["serialized_bytes"] / 4
    seed = report["settings"]["adult"]["per_seed"][0]
    lg = seed["lgreco:sq:3"]
    assert np.isclose(lg["bytes_reduction_vs_uniform"], seed["uniform:sq:3"]["bytes_per_round"] / lg["bytes_per_round"])
    assert lg["final_accuracy"] == runs["lgreco:sq:3"]["accuracy"][-1]

    # The plot script reads the same report (needs matplotlib, in the test extra).
    png = tmp_path / "comm.png"
    done = subprocess.run(
        [sys.executable, "benchmarks/plot_communication.py", str(out), "--out", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_exactly_the_undominated_methods():
    from plot_communication import pareto_front

    # (bytes, accuracy): b dominates c (fewer bytes, higher accuracy); a and d trade off.
    points = [(100.0, 0.0), (200.0, 1.0), (300.0, 0.5), (50.0, -2.0), (200.0, 1.0)]
    assert pareto_front(points) == [3, 0, 1, 4]


def test_pareto_table_pairs_each_method_with_the_references_seed_by_seed(tmp_path):
    from plot_communication import markdown_table

    def row(acc, sent, tables=0):
        return {"bytes_per_round": sent, "bytes_per_round_without_tables": sent - tables, "measured_error": 0.1,
                "final_accuracy": acc}

    # b is 1 point above none on every seed (paired: zero spread) although the seeds differ by 10.
    seeds = [{"none": row(0.5 + 0.1 * i, 100), "b": row(0.51 + 0.1 * i, 10, 4)} for i in range(3)]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"settings": {"toy": {"rounds": 2, "per_seed": seeds}}}))
    text = markdown_table(path, versus="b")
    assert "| b | 10 | 4 | +1.00 [+1.00, +1.00] | reference |" in text
    assert "| none | 100 | 0 | reference | -1.00 [-1.00, -1.00] |" in text
