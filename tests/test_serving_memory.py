"""benchmarks/serving_memory.py on the small build: it starts its own server with the models
users serve, warms them up, and reports every process's memory and the catalog files they map,
each once. The figures are not checked (memory is measured, not tested); what they are made of
is: one row per stub, PSS at most RSS, and the mapped files are exactly the distinct tensor
files (inodes) of the loaded models."""

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
           str(small_build.repository), "--requests", "5", "--write", str(doc)]
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
