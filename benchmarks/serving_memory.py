"""Memory of a served repository: every process of the Triton server, after loading and a
warm-up of queries.

    .venv/bin/python -m benchmarks.serving_memory                        # model_repository/
    .venv/bin/python -m benchmarks.serving_memory --repository R --models unified,item_updates
    .venv/bin/python -m benchmarks.serving_memory --repository R --write docs/performance.md

Starts tritonserver (serving/launcher.py) on the repository with the given models loaded
(`--models all`: every model of the repository), sends `--requests` queries with mixed
filters to `unified` and `retrieval` when loaded (so that the served pages are resident, as
under traffic), then reads /proc/<pid>/smaps_rollup of every process of the server's process
group: RSS (counts a page shared by several processes once per process), PSS (shares it
among them: the sum is the memory the tree uses) and the part of RSS that maps files (the
catalog tensors, stages/archive.py, and shared libraries). Also prints the files the models
map, once per inode: the catalog's memory whatever the number of processes.

Then, with the memory read, it checks the answers at this size (`--check N`: N queries per
filter of FILTERS, random users, k = 10, on every served model): recall@10 against the exact
reference (exact filter, exact fp32 search, the same scorer: serving/inprocess.py
exact_reference, run in this process), items outside their filter by the catalog's own
spelling (items.csv, client/catalog.py `satisfies`: independent of every index) and answers
shorter than min(k, matching items). `--check 0` skips it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import doc_sections  # noqa: E402
from serving import launcher  # noqa: E402

SECTION = "## Serving memory (issue 14)"
BEGIN = "<!-- benchmarks/serving_memory.py: begin -->"
END = "<!-- benchmarks/serving_memory.py: end -->"
FILTERS = ["", "category:comedy", "language:en AND NOT tags:short", "creator:5 OR creator:17",
           "NOT language:en"]
GIB = 2 ** 30


def smaps_rollup(pid: int) -> Dict[str, int]:
    """Bytes of Rss, Pss, Rss of files (Rss - Anonymous) and Private pages of a process."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    out["File"] = out.get("Rss", 0) - out.get("Anonymous", 0)
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def process_name(pid: int) -> str:
    argv = launcher.cmdline(pid)
    if not argv:
        return "?"
    if argv[0].endswith("triton_python_backend_stub") and len(argv) > 1:
        version_dir = Path(argv[1]).parent
        return f"stub {version_dir.parent.name}/{version_dir.name}"
    return Path(argv[0]).name


def mapped_catalog_files(pids: List[int], repository: Path) -> Dict[int, tuple]:
    """inode -> (size, one path) of the repository's .npy files any process maps."""
    found: Dict[int, tuple] = {}
    root = str(Path(repository).resolve())
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    f = line.split(maxsplit=5)
                    if len(f) == 6 and f[5].strip().startswith(root) and \
                            f[5].strip().endswith(".npy"):
                        path = Path(f[5].strip())
                        found[int(f[4])] = (path.stat().st_size, path)
        except FileNotFoundError:
            continue
    return found


def warm_up(server: launcher.TritonServer, models: List[str], requests: int,
            users: List[int]) -> float:
    from client import Retriever

    served = [m for m in ("unified", "retrieval") if m in models or models == ["all"]]
    t0 = time.perf_counter()
    for model in served:
        with Retriever(server.config.http_url, "http", model=model) as r:
            for i in range(requests):
                r.query(users[i % len(users)], FILTERS[i % len(FILTERS)], 10)
    return time.perf_counter() - t0


def catalog_csv(repository: Path) -> Path:
    """The items.csv of a built repository: the one next to it (`--repository R --items-csv
    R/../items.csv`, as the builder's examples write them), else the builder's default
    (build/items.csv, for model_repository/). users.csv is written beside it."""
    from client.catalog import DEFAULT_ITEMS_CSV

    beside = Path(repository).parent / "items.csv"
    return beside if beside.exists() else DEFAULT_ITEMS_CSV


def read_users(items_csv: Path) -> List[int]:
    """Up to 100 user ids of the users.csv beside `items_csv` ([1] without one)."""
    users_csv = Path(items_csv).with_name("users.csv")
    if not users_csv.exists():
        return [1]
    lines = users_csv.read_text().split()[1:101]
    return [int(u) for u in lines] or [1]


@dataclass
class AnswerCheck:
    """One served model's answers to one filter's queries, against the exact reference."""
    model: str
    filter: str
    queries: int
    recall: float  # mean recall@k against the exact reference's answers
    outside: int  # returned items that do not satisfy the filter (items.csv)
    short: int  # answers with fewer items than the exact reference's min(k, matching)


def check_answers(server: launcher.TritonServer, repository: Path, items_csv: Path,
                  models: List[str], per_filter: int, k: int = 10) -> List[AnswerCheck]:
    """Every FILTERS expression `per_filter` times (users from users.csv) on every served
    model, against the exact reference and the items.csv reference filter."""
    from benchmarks.recall import exact_results
    from client import Retriever
    from client.catalog import load_items
    from loadtest.workload import Request
    from world.schema import Schema

    users = read_users(items_csv)
    queries = [Request("check", users[(i * 7 + j) % len(users)], f, k)
               for j, f in enumerate(FILTERS) for i in range(per_filter)]
    exact = exact_results(repository, queries)
    served = [m for m in ("unified", "retrieval") if m in models or models == ["all"]]
    got: Dict[str, List] = {}
    for model in served:
        with Retriever(server.config.http_url, "http", model=model) as r:
            got[model] = [r.query(q.user_id, q.filter, q.k).item_ids for q in queries]
    ids = {int(i) for answers in got.values() for a in answers for i in a}
    items = load_items(items_csv, ids)
    schema = Schema.from_json((Path(repository) / "filter" / "1" / "schema.json").read_text())
    return [c for model in served for c in grade(model, queries, got[model], exact, items,
                                                 schema)]


def grade(model: str, queries: List, got: List[np.ndarray], exact: List[np.ndarray],
          items: Dict[int, Dict[str, List[str]]], schema) -> List[AnswerCheck]:
    """One AnswerCheck per filter: `got` (a model's answers) against `exact` (the exact
    reference's) and the filter's meaning over `items` (client/catalog.py load_items)."""
    from benchmarks.recall import query_recall
    from client.catalog import satisfies
    from filtering.expression import parse

    checks = []
    for f in dict.fromkeys(q.filter for q in queries):
        pairs = [(g, e) for q, g, e in zip(queries, got, exact) if q.filter == f]
        node = parse(f, schema)
        checks.append(AnswerCheck(
            model, f, len(pairs),
            float(np.mean([query_recall(g, e) if len(e) else 1.0 for g, e in pairs])),
            sum(not satisfies(node, items[int(i)], schema) for g, _ in pairs for i in g),
            sum(len(g) < len(e) for g, e in pairs)))
    return checks


def answer_table(checks: List[AnswerCheck]) -> str:
    models = list(dict.fromkeys(c.model for c in checks))
    lines = ["| filter | queries | " + " | ".join(f"{m} recall@10" for m in models)
             + " | outside the filter | short answers |",
             "| --- | ---: | " + " | ".join("---:" for _ in models) + " | ---: | ---: |"]
    for f in dict.fromkeys(c.filter for c in checks):
        row = [c for c in checks if c.filter == f]
        lines.append(f"| `{f or '(none)'}` | {row[0].queries} | "
                     + " | ".join(f"{c.recall:.3f}" for c in row)
                     + f" | {sum(c.outside for c in row)} | {sum(c.short for c in row)} |")
    return "\n".join(lines)


def measure(repository: Path, models: List[str], requests: int, check: int = 0,
            items_csv: Optional[Path] = None) -> str:
    items_csv = items_csv or catalog_csv(repository)
    http, grpc, metrics = launcher.free_ports(3)
    explicit = models != ["all"]
    config = launcher.ServerConfig(repository=repository, http_port=http, grpc_port=grpc,
                          metrics_port=metrics,
                          model_control="explicit" if explicit else "none",
                          load_models=models if explicit else [],
                          admin_key="memory-benchmark",
                          log_path=ROOT / "logs" / "serving_memory.log")
    t0 = time.perf_counter()
    server = launcher.TritonServer(config)
    server.start(timeout=1800)
    try:
        ready = time.perf_counter() - t0
        seconds = warm_up(server, models, requests, read_users(items_csv))
        pids = launcher.group_members(server.process.pid)
        rows = []
        for pid in pids:
            try:
                rows.append((process_name(pid), smaps_rollup(pid)))
            except FileNotFoundError:
                continue
        files = mapped_catalog_files(pids, repository)
        checks = check_answers(server, repository, items_csv, models, check) if check else []
    finally:
        server.stop()
    text = report(repository, models, rows, files, ready, requests, seconds)
    if checks:
        text += (f"\n\nAnswers at this size ({check} queries per filter, k = 10, users from "
                 "users.csv; recall against the exact reference, serving/inprocess.py "
                 "exact_reference; *outside the filter*: returned items that do not satisfy it "
                 "by items.csv; *short*: fewer items than the exact reference's min(k, matching "
                 "items)):\n\n" + answer_table(checks))
    return text


def file_table(repository: Path, files: Dict[int, tuple]) -> str:
    """One row per mapped tensor file (inode): its size, bytes per item and the attributes
    of every model that read it."""

    codes = Path(repository) / "ann" / "1" / "ann.search.codes.npy"
    items = int(np.load(codes, mmap_mode="r").shape[0]) if codes.exists() else 0
    readers: Dict[int, List[str]] = defaultdict(list)
    for path in sorted(Path(repository).glob("*/*/*.npy")):
        readers[path.stat().st_ino].append(f"{path.parent.parent.name}:{path.stem}")
    lines = ["| tensor file | bytes | per item | read by (model:attribute) |",
             "| --- | ---: | ---: | --- |"]
    total = 0
    for inode, (size, path) in sorted(files.items(), key=lambda kv: -kv[1][0]):
        total += size
        per_item = f"{size / items:.1f} B" if items else ""
        lines.append(f"| {path.stem.split('.')[-1]} | {size / 2**20:,.1f} MiB | {per_item} | "
                     f"{', '.join(readers.get(inode, [path.name]))} |")
    lines.append(f"| **all** | **{total / 2**20:,.1f} MiB** | "
                 f"**{total / max(items, 1):.1f} B** | |")
    return f"Tensor files ({items:,} items):\n\n" + "\n".join(lines)


def report(repository, models, rows, files, ready, requests, seconds) -> str:
    by_name: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, m in rows:
        for key in ("Rss", "Pss", "File", "Private"):
            by_name[name][key] += m.get(key, 0)
    total = {k: sum(v[k] for v in by_name.values()) for k in ("Rss", "Pss", "File", "Private")}
    lines = ["| process | RSS | PSS | RSS of files | private |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in sorted(by_name, key=lambda n: -by_name[n]["Pss"]):
        v = by_name[name]
        lines.append(f"| {name} | {v['Rss'] / GIB:.2f} GiB | {v['Pss'] / GIB:.2f} GiB | "
                     f"{v['File'] / GIB:.2f} GiB | {v['Private'] / GIB:.2f} GiB |")
    lines.append(f"| **all {len(rows)} processes** | **{total['Rss'] / GIB:.2f} GiB** | "
                 f"**{total['Pss'] / GIB:.2f} GiB** | {total['File'] / GIB:.2f} GiB | "
                 f"{total['Private'] / GIB:.2f} GiB |")
    mapped = sum(size for size, _ in files.values())
    head = (f"Repository `{repository}`, models {', '.join(models)}; ready after {ready:.0f} s, "
            f"then {requests} warm-up queries per served model in {seconds:.1f} s. "
            f"Catalog tensor files mapped: {len(files)} distinct (one per inode), "
            f"{mapped / GIB:.2f} GiB.")
    return head + "\n\n" + "\n".join(lines) + "\n\n" + file_table(repository, files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--models", default="retrieval,unified,item_updates",
                   help="models to load (comma-separated), or 'all' (default: %(default)s)")
    p.add_argument("--requests", type=int, default=200,
                   help="warm-up queries per served model (default: %(default)s)")
    p.add_argument("--check", type=int, default=10, metavar="N",
                   help="after the memory is read, check N queries per filter of every served "
                        "model against the exact reference and items.csv (0: skip; default: "
                        "%(default)s)")
    p.add_argument("--items-csv", type=Path, default=None,
                   help="the repository's items.csv (default: the one next to the "
                        "repository, else build/items.csv); users.csv is read beside it")
    p.add_argument("--write", type=Path, default=None,
                   help="write the table into this markdown file (its own section)")
    a = p.parse_args(argv)
    if a.requests < 0:
        p.error("--requests must be >= 0")
    if a.check < 0:
        p.error("--check must be >= 0")
    items_csv = a.items_csv or catalog_csv(a.repository.resolve())
    if a.check and not items_csv.exists():
        p.error(f"{items_csv}: no items.csv to check answers against (--items-csv, or "
                "--check 0)")
    if not (a.repository / "unified" / "config.pbtxt").exists():
        p.error(f"{a.repository}: not a built repository (python -m builder)")
    models = [m for m in a.models.split(",") if m]
    text = measure(a.repository.resolve(), models, a.requests, a.check, items_csv)
    print(text)
    if a.write is not None:
        command = " ".join([".venv/bin/python -m benchmarks.serving_memory"] + sys.argv[1:])
        stamp = f"{datetime.date.today()}, {platform.processor() or platform.machine()}, " \
                f"{os.cpu_count()} cores"
        generated = f"{BEGIN}\n```bash\n{command}\n```\n\n{stamp}. {text}\n{END}"
        doc_sections.write_section(a.write, SECTION, generated, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
