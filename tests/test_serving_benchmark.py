"""benchmarks/serving.py end to end on the small build: it starts its own real server, drives
the three models, and writes the performance section (tables, ratios, plots) and results.json.
The numbers themselves are not checked (timings are not tests); that every model answered
without failure, with recall measured against the exact reference, is. The first run also
measures unified and retrieval with 3-item request histories (--history 0,3: the history
variants take turns with the models; the baseline, which takes none, runs at 0 only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
def test_serving_benchmark_writes_its_section(small_build, tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n## Another section\n\nkept\n")
    cmd = [sys.executable, "-m", "benchmarks.serving",
           "--repository", str(small_build.repository),
           "--items-csv", str(small_build.config.items_csv),
           "--concurrency", "2", "--rounds", "2", "--seconds", "1", "--warmup", "0.5",
           "--recall-queries", "3", "--out", str(tmp_path / "out"),
           "--doc", str(doc), "--img", str(tmp_path / "img")]
    run = subprocess.run(cmd + ["--history", "0,3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    models = {"unified", "retrieval", "baseline"}
    variants = models | {"unified+history3", "retrieval+history3"}
    assert {r["model"] for r in results["rounds"]} == variants
    assert len(results["rounds"]) == 2 * len(variants)  # every variant in both rounds
    assert {(r["model"], r["history"]) for r in results["rounds"]} == \
        {(m, 3 if "+" in m else 0) for m in variants}
    assert all(r["failures"] == 0 and r["requests"] > 0 and r["requests_per_s"] > 0
               for r in results["rounds"])
    rows = {(r["model"], r["history"], r["concurrency"]): r for r in results["history"]}
    assert set(rows) == {("unified", 3, 2), ("retrieval", 3, 2)}
    for row in rows.values():
        assert row["paired_rounds"] == 2
        assert row["throughput_ratio"] > 0 and row["p50_ratio"] > 0, row
    recall = {model: results["recall"][model]["all"] for model in models}
    # unified and the ensemble run the same stages on the same index: the same answers (up to
    # ties of equal scores); a mix-up of rows and ids would drop any of them far below 0.5
    assert recall["unified"] == pytest.approx(recall["retrieval"], abs=0.05)
    assert min(recall.values()) >= 0.5, recall

    text = doc.read_text()
    assert "## Another section\n\nkept" in text  # other sections untouched
    assert "## Serving: unified vs ensemble vs baseline" in text
    for heading in ("### Recall@10 against exact search", "### Throughput and latency",
                    "### Unified against the baseline and the ensemble (same run)"):
        assert heading in text, heading
    ratio_rows = [line for line in text.splitlines() if line.startswith("| 2 | ")]
    assert len(ratio_rows) == 1 and ratio_rows[0].count("x |") == 3, ratio_rows
    assert "### Request history: with against without (same run)" in text
    history_rows = [line for line in text.splitlines()
                    if line.startswith(("| unified | 3 | 2 |", "| retrieval | 3 | 2 |"))]
    assert len(history_rows) == 2 and all(r.count("x |") == 2 for r in history_rows), \
        history_rows
    assert "| unified+history3 | 2 |" in text  # its own row of the throughput table
    assert "16 clients were not measured in this run" in text
    for image in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / "img" / image).stat().st_size > 0
        assert f"img/{image}" in text

    # a second run (without history, the default) replaces the generated block, it does not
    # add another
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = doc.read_text()
    assert text.count("<!-- benchmarks/serving.py: begin -->") == 1
    assert "history" not in text.split("<!-- benchmarks/serving.py: begin -->")[1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["model"] for r in results["rounds"]} == models and results["history"] == []
