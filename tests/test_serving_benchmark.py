"""benchmarks/serving.py end to end on the small build: it starts its own real server, drives
the three models, and writes the performance section (tables, ratios, plots) and results.json.
The numbers themselves are not checked (timings are not tests); that every model answered
without failure, with recall measured against the exact reference, is. A second run measures
unified and retrieval without and with 3-item request histories (--history 0,3: the history
variants take turns with the models; the baseline, which takes none, runs at 0 only) and
writes its own section, replacing that section's stale block and leaving the first one be."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- benchmarks/serving.py: begin -->"
END = "<!-- benchmarks/serving.py: end -->"
HISTORY_SECTION = "## Serving with request history (issue 17)"


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.server
def test_serving_benchmark_writes_its_section(small_build, tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n## Another section\n\nkept\n\n{HISTORY_SECTION}\n\n"
                   f"{BEGIN}\nstale\n{END}\n\nanalysis kept\n")
    cmd = [sys.executable, "-m", "benchmarks.serving",
           "--repository", str(small_build.repository),
           "--items-csv", str(small_build.config.items_csv),
           "--concurrency", "2", "--rounds", "2", "--seconds", "1", "--warmup", "0.5",
           "--recall-queries", "3", "--out", str(tmp_path / "out"),
           "--doc", str(doc), "--img", str(tmp_path / "img")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    models = {"unified", "retrieval", "baseline"}
    assert {r["model"] for r in results["rounds"]} == models
    assert all(r["failures"] == 0 and r["requests"] > 0 for r in results["rounds"])
    assert results["history"] == []  # no history sizes: no with / without ratios
    recall = {model: results["recall"][model]["all"] for model in models}
    # unified and the ensemble run the same stages on the same index: the same answers (up to
    # ties of equal scores); a mix-up of rows and ids would drop any of them far below 0.5
    assert recall["unified"] == pytest.approx(recall["retrieval"], abs=0.05)
    assert min(recall.values()) >= 0.5, recall

    text = doc.read_text()
    assert "## Another section\n\nkept" in text  # other sections untouched
    assert "\nstale\n" in text  # ... the history section's block too
    assert "## Serving: unified vs ensemble vs baseline" in text
    main = section(text, "## Serving: unified vs ensemble vs baseline")
    for heading in ("### Recall@10 against exact search", "### Throughput and latency",
                    "### Unified against the baseline and the ensemble (same run)"):
        assert heading in main, heading
    assert "history" not in main
    ratio_rows = [line for line in main.splitlines() if line.startswith("| 2 | ")]
    assert len(ratio_rows) == 1 and ratio_rows[0].count("x |") == 3, ratio_rows
    for image in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / "img" / image).stat().st_size > 0
        assert f"img/{image}" in main

    # with and without history in one run: its own section, whose stale block it replaces
    run = subprocess.run(cmd + ["--history", "0,3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    variants = models | {"unified+history3", "retrieval+history3"}
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

    after = doc.read_text()
    assert section(after, "## Serving: unified vs ensemble vs baseline") == main  # left be
    assert after.count(BEGIN) == 2 and "\nstale\n" not in after  # replaced, not added
    history = section(after, HISTORY_SECTION)
    assert history.rstrip().endswith("analysis kept")  # the section's prose is kept
    assert "### Request history: with against without (same run)" in history
    history_rows = [line for line in history.splitlines()
                    if line.startswith(("| unified | 3 | 2 |", "| retrieval | 3 | 2 |"))]
    assert len(history_rows) == 2 and all(r.count("x |") == 2 for r in history_rows), \
        history_rows
    assert "| unified+history3 | 2 |" in history  # its own row of the throughput table
    assert "16 clients were not measured in this run" in history
    for image in ("serving_throughput-history.png", "serving_latency-history.png"):
        assert (tmp_path / "img" / image).stat().st_size > 0
        assert f"img/{image}" in history
