"""The README's client examples, run as written (bash) against a real server: the shell
blocks that call `python -m client`, with only the server's address and the test build's
items.csv put in place of the defaults. An example that stops working fails here."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.server


def client_blocks(text: str):
    """The ```bash blocks that run the client, except those of a catalog other than the
    default build (MovieLens: tests/test_catalog_server.py serves it)."""
    return [b for b in re.findall(r"```bash\n(.*?)```", text, re.S)
            if "-m client" in b and "catalogs/" not in b]


def localize(block: str, http: str, grpc: str, items_csv: Path) -> str:
    """The block pointed at the test server and build: default ports become its ports,
    build/items.csv its items.csv, .venv/bin/python this interpreter."""
    block = block.replace(".venv/bin/python", sys.executable)
    block = block.replace("build/items.csv", str(items_csv))
    block = block.replace("127.0.0.1:8001", grpc)
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        if "-m client" in line:
            if " -u " not in line:
                line = re.sub(r"-m client (query|update)", rf"-m client \1 -u {http}", line)
            line = re.sub(r"-m client (query|update)", rf"-m client \1 --items-csv {items_csv}",
                          line)
        out.append(line)
    return "\n".join(out)


def test_the_readme_has_client_examples():
    blocks = client_blocks(README.read_text())
    commands = [line for b in blocks for line in b.splitlines() if "-m client" in line]
    assert len(blocks) >= 2 and len(commands) >= 5, commands


def test_readme_client_examples_run(small_build, tmp_path):
    from fresh.store import FreshStore, create_store, fresh_dir_for
    from tests.conftest import start_server

    fresh = tmp_path / "fresh"  # a store of its own: the session server never sees these
    create_store(fresh, FreshStore(fresh_dir_for(small_build.repository)).header)
    server = start_server(small_build.repository, tmp_path / "tritonserver.log",
                          fresh_dir=fresh)
    try:
        for block in client_blocks(README.read_text()):
            script = localize(block, server.config.http_url, server.config.grpc_url,
                              small_build.config.items_csv)
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{script}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
            assert "error" not in run.stderr.lower(), run.stderr[-2000:]
    finally:
        server.stop()
    assert FreshStore(fresh).updates == 3  # the three updates of the fresh-items example
