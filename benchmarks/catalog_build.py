"""How long `python -m builder --catalog DIR` takes, and how much memory, for a large catalog.

    .venv/bin/python benchmarks/catalog_build.py                       # 1M items + ml-latest-small
    .venv/bin/python benchmarks/catalog_build.py --num-items 20000 --no-movielens   # smoke run
    .venv/bin/python benchmarks/catalog_build.py --write docs/performance.md

1. Writes the synthetic world (world/synthetic.py) as a catalog directory in Parquet
   (catalog/write.py write_world: items with four features and 64-wide vectors, interactions
   with click/like/share, users with a language, catalog.toml) into a temporary directory.
   A world of more than --shard-items items (default 1,000,000) is generated and written in
   shards of at most that many (catalog/write.py write_worlds, one shard in memory at a
   time), because generate_world holds about 2 KB per item while it draws a world (some
   20 GB at 10M items, more than the build needs): shard k is the world of seed + k with its
   share of the items and users, its item ids offset by k x 10^12 so that they stay
   distinct, and its users interact with its own items only. Up to --shard-items items the
   catalog is generate_world's world itself.
2. Runs `/usr/bin/time -v python -m builder --catalog DIR --repository OUT/model_repository
   --items-csv OUT/items.csv` twice, and reads the wall time, CPU time and peak RSS ("Maximum
   resident set size": the largest process; the builder runs in one) from /usr/bin/time.
3. Does the same for MovieLens ml-latest-small (../shared/data/ml-latest-small) when present,
   through a temporary directory of links to its two files (its licence forbids copies).

Trained weights are cached in build/weights/ (training/train.py load_or_train) under a key of
the catalog's content and name. This run gives its catalogs names of their own
(`<catalog>-bench<pid>`), so the first build trains, as a new catalog's does, and the second
(`rebuild`) loads the weights the first saved, as rebuilding an unchanged catalog does. The
script checks which happened (a weights file written during the build) and reports it. The
weights files this run wrote are removed at the end (--keep-weights keeps them); nothing else
in build/weights/ is touched.

The machine is often shared: before each build the script waits (at most --wait-minutes in the
whole run) for the 1-minute load average to fall to --max-load, then measures anyway, and
records the load before and after each build.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import doc_sections  # noqa: E402
from training.train import WEIGHTS_DIR  # noqa: E402
from world.synthetic import WorldConfig  # noqa: E402

SECTION = "## Building a catalog"
BEGIN = "<!-- benchmarks/catalog_build.py: begin -->"
END = "<!-- benchmarks/catalog_build.py: end -->"
MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"
TIME = "/usr/bin/time"
ITEM_ID_SPAN = 10**12  # world/synthetic.py draws item ids from [1, 10^12)


@dataclass
class Measured:
    """One build: what it was built from and what /usr/bin/time reported."""

    catalog: str
    items: int
    interactions: int
    users: int
    returncode: int
    wall_s: float
    user_s: float
    system_s: float
    peak_rss_mib: float
    build_seconds: Optional[float]  # the builder's own clock (build_info.json)
    trained: bool  # a weights file was written during the build
    load_before: str
    load_after: str

    def row(self) -> str:
        training = "trained" if self.trained else "cached weights"
        return (f"| {self.catalog} | {self.items:,} | {self.interactions:,} | {self.users:,} | "
                f"{training} | {self.wall_s:,.1f} | {self.user_s + self.system_s:,.1f} | "
                f"{self.peak_rss_mib / 1024:,.2f} | {self.load_before} | {self.load_after} |")


HEADER = ("| catalog | items | interactions | users | weights | wall s | CPU s (user + sys) "
          "| peak RSS GiB | load before | load after |\n"
          "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(max_load: float, deadline: float) -> None:
    """Wait until the 1-minute load average is at most `max_load`, until `deadline` at most
    (time.monotonic())."""
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"  load average {load_average()} > {max_load}: waiting (up to "
              f"{(deadline - time.monotonic()) / 60:.1f} more min)", flush=True)
        time.sleep(30)
    if os.getloadavg()[0] > max_load:
        print(f"  load average still {load_average()}: measuring anyway", flush=True)


def parse_time_v(text: str) -> dict:
    """Wall, user and system seconds and peak RSS (KiB) from `/usr/bin/time -v` output."""
    def field(label: str) -> str:
        m = re.search(rf"^\s*{re.escape(label)}:\s*(\S+)\s*$", text, re.M)
        if m is None:
            raise ValueError(f"/usr/bin/time output has no {label!r}:\n{text}")
        return m.group(1)

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {"wall_s": wall, "user_s": float(field("User time (seconds)")),
            "system_s": float(field("System time (seconds)")),
            "peak_rss_kib": int(field("Maximum resident set size (kbytes)"))}


def run_build(name: str, catalog_dir: Path, out: Path, counts: tuple, weights_prefix: str,
              args) -> Measured:
    """`python -m builder --catalog catalog_dir` under /usr/bin/time -v, into `out`;
    `weights_prefix` starts the name of the catalog's file in build/weights/."""
    wait_for_quiet(args.max_load, args.wait_deadline)
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "time-v.txt"
    cmd = [TIME, "-v", "-o", str(stats), sys.executable, "-m", "builder",
           "--catalog", str(catalog_dir), "--repository", str(out / "model_repository"),
           "--items-csv", str(out / "items.csv")]
    before = load_average()
    print(f"building {name}: {' '.join(cmd[4:])}  (load {before})", flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT)  # the builder's progress goes to this terminal
    after = load_average()
    t = parse_time_v(stats.read_text())
    trained = any(p.stat().st_mtime >= start for p in WEIGHTS_DIR.glob(f"{weights_prefix}-*.pt"))
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if done.returncode == 0 and info.get("num_items") != counts[0]:
        raise RuntimeError(f"{name}: built {info.get('num_items')} items, expected {counts[0]}")
    m = Measured(name, counts[0], counts[1], counts[2], done.returncode, t["wall_s"],
                 t["user_s"], t["system_s"], t["peak_rss_kib"] / 1024,
                 info.get("build_seconds"), trained, before, after)
    print(f"  {name}: exit {m.returncode}, wall {m.wall_s:.1f} s, CPU "
          f"{m.user_s + m.system_s:.1f} s, peak RSS {m.peak_rss_mib:,.0f} MiB, "
          f"{'trained' if trained else 'cached weights'}", flush=True)
    return m


def synthetic_worlds(num_items: int, num_users: int, seed: int, shard_items: int):
    """The synthetic world in shards of at most `shard_items` items, generated one at a
    time (the module docstring): one shard, the world itself, when num_items <=
    shard_items."""
    from world.synthetic import generate_world

    shards = -(-num_items // shard_items)
    for k in range(shards):
        items = num_items * (k + 1) // shards - num_items * k // shards
        users = num_users * (k + 1) // shards - num_users * k // shards
        world = generate_world(WorldConfig(seed=seed + k, num_items=items, num_users=users))
        world.catalog.item_ids += k * ITEM_ID_SPAN  # generate_world's ids are < ITEM_ID_SPAN
        if shards > 1:
            print(f"  shard {k + 1}/{shards}: {items:,} items, {users:,} users", flush=True)
        yield world
        del world  # before the next shard is drawn: one in memory at a time


def write_synthetic(directory: Path, num_items: int, num_users: int, seed: int,
                    shard_items: int) -> tuple:
    """The synthetic world as a Parquet catalog in `directory`: (items, interactions, users)."""
    from catalog.write import write_worlds

    t0 = time.perf_counter()
    print(f"generating the synthetic world: {num_items:,} items, {num_users:,} users, and "
          f"writing it as a catalog into {directory} ...", flush=True)
    counts = [0, 0, 0]
    user_ids = []

    def counted(worlds):
        for world in worlds:
            counts[0] += world.catalog.num_items
            counts[1] += len(world.interactions.user_index)
            counts[2] += len(world.user_ids)
            user_ids.append(world.user_ids)
            yield world
            del world

    write_worlds(counted(synthetic_worlds(num_items, num_users, seed, shard_items)), directory)
    gc.collect()
    pa.default_memory_pool().release_unused()  # what this process holds during the builds
    if len(np.unique(np.concatenate(user_ids))) != counts[2]:  # 63-bit random ids: ~never
        raise RuntimeError("two shards drew the same user id: run again with another --seed")
    size = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    print(f"  {counts[1]:,} interactions; {size:,.0f} MiB of Parquet in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return tuple(counts)


def movielens_counts(directory: Path) -> tuple:
    """(movies, ratings, users) of a MovieLens directory."""
    import pyarrow.csv as pacsv

    movies = pacsv.read_csv(directory / "movies.csv").num_rows
    ratings = pacsv.read_csv(directory / "ratings.csv")
    return movies, ratings.num_rows, len(ratings.column("userId").unique())


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU used; python "
            f"{platform.python_version()}, torch {torch.__version__}; commit {commit}; "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


def generated_block(results: List[Measured], command: str, num_users: int) -> str:
    lines = [BEGIN, "", f"Command: `{command}`", "", f"Machine: {machine()}.", "",
             HEADER] + [m.row() for m in results]
    failed = [m for m in results if m.returncode != 0]
    if failed:
        lines += ["", "Failed builds (exit status): "
                  + ", ".join(f"{m.catalog} ({m.returncode})" for m in failed)]
    lines += ["", "*wall s*, *CPU s* and *peak RSS* are `/usr/bin/time -v`'s (\"Elapsed (wall "
              "clock) time\", user + system time, \"Maximum resident set size\") for the whole "
              "`python -m builder` process, interpreter start included. *weights*: "
              "\"trained\" when the build wrote a weights file to build/weights/ (it trained "
              "the towers, OverArch and heads), \"cached weights\" when it loaded the ones the "
              "first build saved. *load*: the 1-minute, 5-minute and 15-minute load "
              f"averages. Synthetic users: {num_users:,} (the builder's default "
              f"{WorldConfig.num_users:,} per {WorldConfig.num_items:,} items, scaled).",
              "", END]
    return "\n".join(lines)


def write_section(doc: Path, generated: str) -> None:
    """This script's block of section SECTION (benchmarks/doc_sections.py)."""
    doc_sections.write_section(doc, SECTION, generated, BEGIN, END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/catalog_build.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=1_000_000,
                   help="items of the synthetic catalog")
    p.add_argument("--num-users", type=int, default=None,
                   help="users of the synthetic catalog (default: the builder's default users "
                        "per item, scaled to --num-items)")
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--shard-items", type=int, default=1_000_000,
                   help="generate and write a larger synthetic world in shards of at most "
                        "this many items (the docstring)")
    p.add_argument("--out", type=Path, default=None,
                   help="build outputs go to OUT/<catalog>/ and are kept (default: a temporary "
                        "directory, removed at the end)")
    p.add_argument("--movielens", type=Path, default=MOVIELENS,
                   help="a MovieLens directory to build too, when it exists")
    p.add_argument("--no-movielens", action="store_true")
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--no-rebuild", dest="rebuild", action="store_false",
                   help="only the first build of each catalog (no second, cached-weights build)")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep the weights files this run trained (build/weights/*-<tag>-*.pt)")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait for the 1-minute load average to fall to this before a build")
    p.add_argument("--wait-minutes", type=float, default=15.0,
                   help="longest wait for --max-load in the whole run, then measure anyway")
    p.add_argument("--write", type=Path, default=None, metavar="DOC",
                   help=f"replace the generated block of section {SECTION!r} of DOC "
                        "(docs/performance.md)")
    a = p.parse_args(argv)
    if not Path(TIME).exists():
        p.error(f"{TIME} (GNU time) is needed: apt-get install time")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
    a.wait_deadline = time.monotonic() + a.wait_minutes * 60
    num_users = a.num_users or max(1, round(WorldConfig.num_users * a.num_items
                                            / WorldConfig.num_items))
    # This run's catalogs get names no other build has: the weights cache misses (the first
    # build trains) and this run's weights files are told apart from everyone else's.
    tag = f"bench{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix="catalog_build-"))
    out = a.out or scratch / "out"
    results: List[Measured] = []

    def build_twice(label: str, directory: Path, counts: tuple, name: str) -> None:
        results.append(run_build(f"{label}, first build", directory, out / name, counts,
                                 name, a))
        if a.rebuild:
            results.append(run_build(f"{label}, rebuild", directory, out / name, counts,
                                     name, a))

    try:
        if not a.no_movielens:
            if (a.movielens / "movies.csv").exists():
                # links to the files, not copies (the licence); the catalog's name is the
                # directory's
                name = f"{a.movielens.resolve().name}-{tag}"
                directory = scratch / name
                directory.mkdir()
                for f in ("movies.csv", "ratings.csv"):
                    (directory / f).symlink_to((a.movielens / f).resolve())
                build_twice(a.movielens.resolve().name, directory,
                            movielens_counts(a.movielens), name)
            else:
                print(f"no MovieLens directory at {a.movielens}: skipped", flush=True)
        if not a.no_synthetic:
            name = f"synthetic-{a.num_items}-{tag}"
            directory = scratch / name
            counts = write_synthetic(directory, a.num_items, num_users, a.seed,
                                     a.shard_items)
            toml = directory / "catalog.toml"
            toml.write_text(re.sub(r'^name = ".*"$', f'name = "{name}"', toml.read_text(),
                                   count=1, flags=re.M))
            build_twice(f"synthetic {a.num_items:,} items (Parquet)", directory, counts, name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not a.keep_weights:
            for path in WEIGHTS_DIR.glob(f"*-{tag}-*.pt"):
                path.unlink()
    command = ".venv/bin/python benchmarks/catalog_build.py" + \
        "".join(f" {x}" for x in (sys.argv[1:] if argv is None else argv))
    print("\n" + HEADER + "\n" + "\n".join(m.row() for m in results))
    if a.write:
        write_section(a.write, generated_block(results, command, num_users))
        print(f"wrote the block of {SECTION!r} in {a.write}")
    return 0 if all(m.returncode == 0 for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
