"""Every command-line entry point answers --help with its usage and exits 0, without
starting, building or writing anything (a --help that runs the command is a trap)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["builder", "training", "training.evaluate", "client", "serving.serve",
           "serving.demo", "serving.swap", "deploy.rollout_swap", "benchmarks.serving",
           "benchmarks.ann_benchmark", "benchmarks.filter_benchmark", "benchmarks.fresh_items",
           "benchmarks.soak", "benchmarks.zch_benchmark", "benchmarks.gpu_ann",
           "benchmarks.gpu_bloom", "benchmarks.gpu_zch", "benchmarks.gpu_serving",
           "benchmarks.gpu_vs_chain", "kernels.build_ext",
           "benchmarks.catalog_build", "benchmarks.serving_memory",
           "benchmarks.scorer_history", "benchmarks.synthetic_bounds"]


def test_every_entry_point_is_listed():
    """A new `python -m` entry point must be added above (serving/watchdog.py is internal:
    the launcher starts it with a pipe, it takes no arguments)."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests", ".git") or "site-packages" in rel.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "__main__.py":
            found.add(".".join(rel.parts[:-1]))
        elif '__name__ == "__main__"' in text:
            found.add(".".join(rel.with_suffix("").parts))
    found.discard("serving.watchdog")
    assert found <= set(MODULES), sorted(found - set(MODULES))


@pytest.mark.parametrize("module", MODULES)
def test_help_prints_usage_and_does_nothing(module):
    before = {p for p in (ROOT / "build").rglob("*")} if (ROOT / "build").exists() else set()
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout.lower(), run.stdout[:500]
    assert time.monotonic() - t0 < 60
    after = {p for p in (ROOT / "build").rglob("*")} if (ROOT / "build").exists() else set()
    assert after == before, sorted(after - before)[:5]


def test_client_query_history_flag(capsys):
    """`client query --history`: ids by commas and/or spaces, newest first, kept in order; an
    empty value is an empty history (sent as such); no flag sends none; a non-integer is an
    argparse error (exit 2) that names --history; --help shows it."""
    from client.__main__ import build_parser

    parser = build_parser()

    def history(*flags):
        return parser.parse_args(["query", "--user-id", "7", *flags]).history

    assert history() is None
    assert history("--history", "1017,33,4096") == [1017, 33, 4096]
    assert history("--history", "1017, 33 4096") == [1017, 33, 4096]
    assert history("--history", "5") == [5]
    assert history("--history", "") == []
    for bad in ("1017,x", "1.5", "3,,a"):
        with pytest.raises(SystemExit) as exit:
            history("--history", bad)
        assert exit.value.code == 2
        error = capsys.readouterr().err
        assert "argument --history" in error and "is not an item id" in error, error
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["query", "--help"])
    assert exit.value.code == 0
    assert "--history ID[,ID...]" in capsys.readouterr().out
