"""benchmarks/serving_memory.py on the small build: it starts its own server with the models
users serve, warms them up, and reports every process's memory and the catalog files they map,
each once. The figures are not checked (memory is measured, not tested); what they are made of
is: one row per stub, PSS at most RSS, and the mapped files are exactly the distinct tensor
files (inodes) of the loaded models. Its answer check runs too and must find every answer
inside its filter, none short, and recall near the exact reference's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving_memory import smaps_rollup

ROOT = Path(__file__).resolve().parents[1]
LOADED = ("filter", "ann", "scorer", "aggregator", "unified")  # retrieval's steps + unified


def test_smaps_rollup_of_this_process():
    m = smaps_rollup(os.getpid())
    assert 0 < m["Pss"] <= m["Rss"] and 0 <= m["File"] <= m["Rss"]


@pytest.mark.server
def test_serving_memory_reports_every_process_and_each_file_once(small_build, tmp_path):
    doc = tmp_path / "performance.md"
    cmd = [sys.executable, "-m", "benchmarks.serving_memory", "--repository",
           str(small_build.repository), "--requests", "5", "--check", "2", "--items-csv",
           str(small_build.config.items_csv), "--write", str(doc)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = doc.read_text()
    assert "## Serving memory (issue 14)" in text
    for model in LOADED + ("item_updates",):
        assert f"| stub {model}/1 |" in text, model
    total = re.search(r"\| \*\*all (\d+) processes\*\* \| \*\*([\d.]+) GiB\*\* \| "
                      r"\*\*([\d.]+) GiB\*\*", text)
    assert total and float(total.group(3)) <= float(total.group(2))
    inodes = {p.stat().st_ino for m in LOADED
              for p in (small_build.repository / m / "1").glob("*.npy")}
    mapped = int(re.search(r"Catalog tensor files mapped: (\d+) distinct", text).group(1))
    assert mapped == len(inodes) > 0
    rows = re.findall(r"^\| `([^`]*)` \| 2 \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \|$",
                      text, re.M)
    assert len(rows) == 5, text[-2000:]  # the five FILTERS, unified and retrieval
    for expression, unified, retrieval, outside, short in rows:
        assert (outside, short) == ("0", "0"), expression
        assert float(unified) >= 0.8 and float(retrieval) >= 0.8, expression


def test_grade_counts_what_is_wrong(small_build):
    """The answer check on answers made wrong on purpose: an item outside its filter, a
    short answer and a missed item are each counted; right answers score 1.0 and 0."""
    import numpy as np

    from benchmarks.serving_memory import AnswerCheck, answer_table, grade
    from client.catalog import load_items
    from loadtest.workload import Request
    from world.schema import Schema

    items = load_items(small_build.config.items_csv)
    schema = Schema.from_json((small_build.repository / "filter" / "1" / "schema.json")
                              .read_text())
    english = [i for i, it in items.items() if "en" in it["language"]][:4]
    other = next(i for i, it in items.items() if "en" not in it["language"])
    queries = [Request("check", 1, "language:en", 3), Request("check", 2, "language:en", 3),
               Request("check", 3, "", 2)]
    exact = [np.array(english[:3]), np.array(english[1:4]), np.array([other, english[0]])]
    got = [np.array(english[:2] + [other]),  # one outside the filter, one missed
           np.array(english[1:3]),  # short, one missed
           np.array([english[0], other])]  # right (order aside)
    checks = grade("unified", queries, got, exact, items, schema)
    assert checks == [AnswerCheck("unified", "language:en", 2, (2 / 3 + 2 / 3) / 2, 1, 1),
                      AnswerCheck("unified", "", 1, 1.0, 0, 0)]
    assert "| `language:en` | 2 | 0.667 | 1 | 1 |" in answer_table(checks)
