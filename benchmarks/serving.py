"""Serving benchmark: `unified` against the `retrieval` ensemble and the `baseline` service chain.

One Triton server with every model, one catalog, one request mix (loadtest/workload.py), the
same Locust users as `make loadtest` (loadtest/locustfile.py, run in this process): each model
is driven closed-loop at several concurrency levels for a bounded time. Models take turns at
every level, in several rounds, and the median round counts, so that changes in the machine's
background load hit all models alike and one disturbed round does not decide a number.
Recall@k of every model is measured against exact search on a fixed evaluation set.

Request histories (issue 17): `--history 0,100` measures every model that takes the optional
`history` input both without one and with 100-item histories, as two variants (`unified` and
`unified+history100`) that take turns with the other models like models do, and reports the
ratios (throughput without / with, p50 with / without) against the 1.3x bound at 16 clients.

    .venv/bin/python -m benchmarks.serving                       # 200k items, a few minutes
    .venv/bin/python -m benchmarks.serving --num-items 6000 --seconds 3 --concurrency 1,4 \\
        --no-docs                                                # smoke run
    .venv/bin/python -m benchmarks.serving --gpu                 # on a GPU host (Dockerfile)
    .venv/bin/python -m benchmarks.serving --models unified,retrieval --history 0,100 \\
        --concurrency 16 --rounds 5                              # with against without history
    .venv/bin/python -m benchmarks.serving --models unified,retrieval --history 20
                                                                 # every request sends one

It builds the repository from the checked-out code into runs/benchmark/ (so it measures the
code as it is; --repository reuses a build), writes runs/benchmark/results.json (with several
--history sizes, its `history` list holds the with / without ratios), the plots
docs/img/serving_*.png and the generated part of the section "Serving: unified vs ensemble vs
baseline (issues 7 & 8)" of docs/performance.md. A run whose requests send histories (any
--history size above 0) writes the section "Serving with request history (issue 17)" and
docs/img/serving_*-history.png instead, and leaves the other section as it is.

Definitions.
  throughput   successful requests per second over the measured interval (after a warm-up)
  latency      client-side, per request, from Locust (ms, Locust's rounding)
  recall@k     mean over evaluation queries of |returned ∩ exact| / |exact|, where `exact` is
               the top k of the same scorer + aggregator over the exact fp32 top
               (oversample x k) inner-product candidates among the items passing the filter
               (serving/inprocess.py exact_reference); queries no item matches are skipped
  avg batch    delta nv_inference_count / delta nv_inference_exec_count per member model
  CPU          cores busy on average: the server (tritonserver and its Python-backend stubs),
               this process (the load generator), and everything else on the machine
  history      `<model>+history<N>`: the model's requests carry N distinct catalog item ids
               drawn uniformly (loadtest/workload.py); recall is measured without history
"""

from gevent import monkey

monkey.patch_all()  # before anything opens sockets or threads: Locust users run on gevent

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List  # noqa: E402

import gevent  # noqa: E402
import locust  # noqa: E402
import numpy as np  # noqa: E402
from locust.argument_parser import get_parser  # noqa: E402
from locust.env import Environment  # noqa: E402

from benchmarks import doc_sections  # noqa: E402
from benchmarks.recall import (  # noqa: E402
    exact_results,
    match_baseline_recall,
    query_recall,
)
from builder.build import ROOT, BuildConfig, build, is_built  # noqa: E402
from client import Retriever  # noqa: E402
from loadtest import locustfile, metrics  # noqa: E402
from loadtest.workload import Request, Workload, parse_history_sizes  # noqa: E402
from serving.inprocess import InProcessChain  # noqa: E402
from serving.launcher import ServerConfig, TritonServer, free_ports  # noqa: E402
from stages.history import MAX_HISTORY  # noqa: E402
from world.synthetic import WorldConfig  # noqa: E402

MODELS = ("unified", "retrieval", "baseline")
MEMBERS = {"unified": ("unified",), "retrieval": ("filter", "ann", "scorer", "aggregator"),
           "baseline": ("baseline_filter", "baseline_ann", "scorer", "aggregator")}
SECTION = "## Serving: unified vs ensemble vs baseline (issues 7 & 8)"
GPU_SECTION = "## Serving on a GPU host (issue 8)"
# a run with request histories writes its own section and plots, leaving the above as they are
HISTORY_SECTION = "## Serving with request history (issue 17)"
GPU_HISTORY_SECTION = "## Serving with request history on a GPU host (issue 17)"
BEGIN, END = "<!-- benchmarks/serving.py: begin -->", "<!-- benchmarks/serving.py: end -->"
OUT = ROOT / "runs" / "benchmark"
HISTORY_BOUND, HISTORY_CLIENTS = 1.3, 16  # issue 17: with history within 1.3x at 16 clients
CLOCK = os.sysconf("SC_CLK_TCK")


def variant(model: str, history: int) -> str:
    """What a (model, history size) pair is called in results.json, the tables and plots."""
    return f"{model}+history{history}" if history else model


def served_model(label: str) -> str:
    """The Triton model of a variant label."""
    return label.split("+", 1)[0]


@dataclass
class Point:
    model: str  # the variant: the Triton model, `+history<N>` when requests send histories
    concurrency: int
    seconds: float
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    batch_sizes: Dict[str, float]
    server_cores: float  # CPU seconds per second of the server process tree
    client_cores: float  # ... of this process (the load generator)
    other_cores: float  # ... of everything else on the machine
    latency_histogram: Dict[int, int] = field(default_factory=dict)  # ms -> requests
    history: int = 0  # item ids in every measured request's history input (0: not sent)


# --- CPU accounting ---------------------------------------------------------------------------
def _process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK  # utime + stime


def _children(pid: int) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat, everything but idle/iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK


class CpuMeter:
    """Busy CPU of the server tree, this process and the rest of the machine over an interval."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.stubs = _children(server_pid)  # the Python-backend stub processes

    def read(self):
        own = resource.getrusage(resource.RUSAGE_SELF)
        server = _process_cpu(self.server_pid) + sum(_process_cpu(p) for p in self.stubs)
        return time.perf_counter(), server, own.ru_utime + own.ru_stime, _machine_busy()

    @staticmethod
    def cores(start, end):
        wall = end[0] - start[0]
        server, client, machine = (end[i] - start[i] for i in (1, 2, 3))
        return server / wall, client / wall, max(0.0, machine - server - client) / wall


# --- one measured point ------------------------------------------------------------------------
def drive(server: TritonServer, workload: Workload, model: str, concurrency: int,
          protocol: str, warmup: float, seconds: float, cpu: CpuMeter) -> Point:
    """Closed-loop Locust users of `model` at `concurrency` for `warmup` + `seconds`, sending
    `workload`'s requests (with its histories, if any)."""
    c = server.config
    metrics_url = f"http://{c.host}:{c.metrics_port}/metrics"
    options = get_parser().parse_args(args=[
        "--host", f"http://{c.http_url}", "--triton-grpc-url", c.grpc_url,
        "--triton-metrics-url", metrics_url, "--triton-model", model,
        "--triton-k", str(workload.k), "--triton-history", str(workload.history)])
    user = locustfile.GrpcTritonUser if protocol == "grpc" else locustfile.HttpTritonUser
    env = Environment(user_classes=[user], events=locust.events, host=f"http://{c.http_url}",
                      parsed_options=options)
    env.triton_workload = workload  # the same requests for every model and level
    runner = env.create_local_runner()
    runner.start(concurrency, spawn_rate=min(100, concurrency * 10))
    gevent.sleep(warmup)
    env.stats.reset_all()
    before, cpu_start = metrics.scrape(metrics_url), cpu.read()
    gevent.sleep(seconds)
    cpu_end, after = cpu.read(), metrics.scrape(metrics_url)
    total = env.stats.total
    snapshot = (total.num_requests, total.num_failures, dict(total.response_times),
                [float(total.get_response_time_percentile(q) or 0) for q in (.5, .95, .99)])
    runner.quit()
    requests, failures, histogram, (p50, p95, p99) = snapshot
    elapsed = cpu_end[0] - cpu_start[0]
    sizes = metrics.batch_sizes(before, after)
    server_cores, client_cores, other_cores = CpuMeter.cores(cpu_start, cpu_end)
    return Point(variant(model, workload.history), concurrency, round(elapsed, 2), requests,
                 failures,
                 (requests - failures) / elapsed, p50, p95, p99,
                 {m: round(sizes[m], 2) for m in MEMBERS.get(model, (model,)) if m in sizes},
                 round(server_cores, 2), round(client_cores, 2), round(other_cores, 2),
                 {int(k): v for k, v in histogram.items()}, workload.history)


# --- recall ------------------------------------------------------------------------------------
def recall(server: TritonServer, model: str, queries: List[Request],
           exact: List[np.ndarray]) -> Dict[str, float]:
    """recall@k per request kind and over all ('all') of `model` against `exact`."""
    per_kind: Dict[str, List[float]] = {}
    with Retriever(server.config.http_url, "http", model, timeout=60) as r:
        for q, want in zip(queries, exact):
            if len(want) == 0:
                continue
            got = r.query(q.user_id, q.filter, q.k).item_ids
            per_kind.setdefault(q.kind, []).append(query_recall(got, want))
    result = {kind: float(np.mean(v)) for kind, v in per_kind.items()}
    result["all"] = float(np.mean([x for v in per_kind.values() for x in v]))
    return result




# --- what each model costs before Triton ------------------------------------------------------
STEPS = ("filter", "ann", "scorer", "aggregator")


def stage_costs(repository: Path, queries: List[Request], batch_sizes=(1, 8)
                ) -> Dict[str, Dict[str, float]]:
    """CPU ms per query of every model's steps run in this process on one thread (the same
    runners and artifacts Triton runs): the compute each model needs before Triton's
    scheduling, the Python-backend IPC and the client add theirs."""
    import faiss
    import torch

    from serving.runners import RUNNERS

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    chains = {"retrieval": InProcessChain(repository, "filter", "ann"),
              "baseline": InProcessChain(repository)}
    unified = RUNNERS["unified"](repository / "unified" / "1")
    def run_unified(part):
        unified.run([{"user_id": np.array([[q.user_id]], np.int64),
                      "filter": np.array([[q.filter.encode()]], object),
                      "k": np.array([[q.k]], np.int32)} for q in part])

    costs: Dict[str, Dict[str, float]] = {}
    for b in batch_sizes:
        batches = [queries[i: i + b] for i in range(0, len(queries), b)]
        for part in batches[:3]:  # TorchScript optimizes a graph on its first runs: unmeasured
            run_unified(part)
            for chain in chains.values():
                chain.run([(q.user_id, q.filter, q.k) for q in part])
        start = time.process_time()
        for part in batches:
            run_unified(part)
        costs[f"unified, batch {b}"] = {
            "total": (time.process_time() - start) * 1000 / len(queries)}
        for name, chain in chains.items():
            seconds: Dict[str, float] = {}
            for part in batches:
                chain.run([(q.user_id, q.filter, q.k) for q in part], seconds)
            ms = {step: seconds[step] * 1000 / len(queries) for step in STEPS}
            costs[f"{name}, batch {b}"] = {**ms, "total": sum(ms.values())}
    return costs


# --- the machine and the code ------------------------------------------------------------------
def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> Dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    import faiss
    import torch

    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem_kb / 2**20:.0f} GiB",
            "gpu": _run(["nvidia-smi", "-L"]) or "none",
            "load average before the run": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "locust": locust.__version__,
            "commit": commit + (" + uncommitted changes" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}



# --- report ------------------------------------------------------------------------------------
def plots(points: List[Point], img: Path, suffix: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    img.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(p.model for p in points))  # in the order they ran
    levels = sorted({p.concurrency for p in points})
    style = _styles(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, value, label in ((axes[0], lambda p: p.requests_per_s, "requests / s"),
                             (axes[1], _per_core, "requests / server CPU-second")):
        for m in models:
            mine = sorted((p for p in points if p.model == m), key=lambda p: p.concurrency)
            ax.plot([p.concurrency for p in mine], [value(p) for p in mine], marker="o",
                    label=m, **style[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_title("Throughput vs concurrency")
    axes[1].set_title("Throughput per server CPU core")
    throughput = img / f"serving_throughput{suffix}.png"
    fig.tight_layout()
    fig.savefig(throughput, dpi=120)
    plt.close(fig)

    # the same load for every model: the level closest to 16 clients
    level = min(levels, key=lambda c: abs(c - 16))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in models:
        point = next(p for p in points if p.model == m and p.concurrency == level)
        ms = np.array(sorted(point.latency_histogram), dtype=float)
        counts = np.array([point.latency_histogram[int(x)] for x in ms], dtype=float)
        if counts.sum() == 0:
            continue
        ax.plot(ms, np.cumsum(counts) / counts.sum(), drawstyle="steps-post",
                label=f"{m} ({point.requests_per_s:.0f} req/s)", **style[m])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency (ms, client side)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency distribution, {level} concurrent clients")
    ax.grid(True, alpha=0.3)
    ax.legend()
    latency = img / f"serving_latency{suffix}.png"
    fig.tight_layout()
    fig.savefig(latency, dpi=120)
    plt.close(fig)
    return [throughput, latency]


def _styles(points: List[Point]) -> Dict[str, dict]:
    """Line style per variant: a colour per Triton model, dashed (dotted, ...) with histories."""
    served = list(dict.fromkeys(served_model(p.model) for p in points))
    sizes = sorted({p.history for p in points})
    dashes = ("-", "--", ":", "-.")
    return {p.model: {"color": f"C{served.index(served_model(p.model)) % 10}",
                      "linestyle": dashes[sizes.index(p.history) % len(dashes)]}
            for p in points}


def markdown(args, info, workload: Workload, sizes: List[int],
             recalls: Dict[str, Dict[str, float]], matched: Dict[str, float],
             costs: Dict[str, Dict[str, float]], points: List[Point], all_rounds: List[dict],
             with_history: List[dict], images: List[Path], doc: Path) -> str:
    """The generated block; `workload` sends no history, `sizes` are the --history sizes."""
    kinds = list(workload.mix)
    command = " ".join([".venv/bin/python -m benchmarks.serving"] + args.argv)
    lines = [BEGIN, "", f"Command: `{command}`", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", f"Catalog: {workload.num_items:,} items; k = {workload.k}; protocol "
              f"{args.protocol}. Every (model, clients) point is the median of {args.rounds} "
              f"rounds of {args.warmup:g} s warm-up + {args.seconds:g} s measured, the models "
              "taking turns" + ("" if not any(sizes) else " (a model sending N-item "
                                "histories, `<model>+history<N>`, takes its own turn)")
              + "; failures are counted over all rounds. The load generator (Locust, "
              "one process) shares the machine with the server. Request mix "
              f"`{args.mix}` (loadtest/workload.py):", ""]
    lines += [f"- {line}" for line in workload.describe().splitlines()]
    lines += [f"- {workload.with_history(n).describe().splitlines()[-1]} (`<model>+history{n}`"
              f"{'' if 0 in sizes else '; no model is measured without history'})"
              for n in sizes if n]
    lines += ["", f"### Recall@{workload.k} against exact search "
              f"({args.recall_queries} queries per kind)", ""]
    if any(sizes):
        sent = ", ".join(f"`+history{n}`" for n in sizes if n)
        lines += ["Measured without a `history` input (the exact reference takes none); the "
                  f"throughput points of {sent} send histories.", ""]
    lines += ["| model | all | " + " | ".join(kinds) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for m, r in recalls.items():
        lines.append(f"| {m} | {r['all']:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in kinds) + " |")
    if matched:
        tried = ", ".join(f"{k.split()[-1]}: {v:.3f}" for k, v in matched.items()
                          if k.startswith("baseline nprobe"))
        lines += ["", f"The baseline is served at equal recall: FAISS nprobe "
                  f"{int(matched['chosen nprobe'])}, the smallest whose recall@{workload.k} on "
                  f"these queries (in process) reaches unified's {matched['unified']:.3f} "
                  f"(nprobe: recall {tried}). A higher nprobe would make the baseline slower "
                  "and more accurate than unified; a lower one, less accurate."]
    lines += ["", "### Compute per query before Triton (CPU ms, in process, one thread)", "",
              "| model, batch | " + " | ".join(STEPS) + " | total |",
              "| --- | " + " | ".join("---:" for _ in STEPS) + " | ---: |"]
    for name, ms in costs.items():
        lines.append(f"| {name} | " + " | ".join(f"{ms[s]:.2f}" if s in ms else ""
                                                  for s in STEPS) + f" | {ms['total']:.2f} |")
    lines += ["", "### Throughput and latency", "",
              "| model | clients | req/s | p50 ms | p95 ms | p99 ms | failures | avg batch "
              "(per member model) | server CPU | server CPU ms / req | load gen. CPU | "
              "other CPU |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    order = list(dict.fromkeys(p.model for p in points))
    for p in sorted(points, key=lambda p: (order.index(p.model), p.concurrency)):
        batches = ", ".join(f"{m} {b:.1f}" for m, b in p.batch_sizes.items())
        mine = [r for r in all_rounds if (r["model"], r["concurrency"]) == (p.model,
                                                                           p.concurrency)]
        failed = f"{sum(r['failures'] for r in mine)}/{sum(r['requests'] for r in mine)}"
        lines.append(f"| {p.model} | {p.concurrency} | {p.requests_per_s:.1f} | {p.p50_ms:.0f} "
                     f"| {p.p95_ms:.0f} | {p.p99_ms:.0f} | {failed} | "
                     f"{batches} | {p.server_cores:.2f} | "
                     f"{1000 * p.server_cores / max(p.requests_per_s, 1e-9):.1f} | "
                     f"{p.client_cores:.2f} | {p.other_cores:.2f} |")
    lines += ["", "CPU columns: cores busy on average during the measured interval.", ""]
    peak = {m: max((p for p in points if p.model == m), key=lambda p: p.requests_per_s)
            for m in order}
    if "unified" in peak and "baseline" in peak:
        lines += ["### Unified against the baseline and the ensemble (same run)", "",
                  "Ratios are medians over rounds of unified / baseline (or / retrieval) "
                  "measured back to back in the same round (paired, so that a change of "
                  "background load between rounds cancels out). *Per server core*: requests "
                  "per CPU-second of the server process tree, i.e. the work each needs per "
                  "request: what dedicated cores would serve, less sensitive to the CPU share "
                  "the server gets on a "
                  "shared machine.", "",
                  "| clients | unified req/s | retrieval req/s | baseline req/s | "
                  "unified / baseline | unified / baseline per server core | "
                  "unified / retrieval |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in sorted({p.concurrency for p in points}):
            row = {p.model: p for p in points if p.concurrency == c}
            if "unified" in row and "baseline" in row:
                ratios, per_core = _paired_ratios(all_rounds, c)
                versus_ensemble, _ = _paired_ratios(all_rounds, c, "unified", "retrieval")
                r = row.get("retrieval")
                lines.append(f"| {c} | {row['unified'].requests_per_s:.1f} | "
                             f"{r.requests_per_s if r else float('nan'):.1f} | "
                             f"{row['baseline'].requests_per_s:.1f} | {ratios:.2f}x"
                             f" | {per_core:.2f}x | {versus_ensemble:.2f}x |")
        u, b = peak["unified"], peak["baseline"]
        ratio = u.requests_per_s / b.requests_per_s if b.requests_per_s else float("inf")
        ru, rb = recalls.get("unified", {}).get("all"), recalls.get("baseline", {}).get("all")
        lines += ["", f"Peak throughput: unified {u.requests_per_s:.1f} req/s "
                  f"(clients: {u.concurrency}), baseline {b.requests_per_s:.1f} req/s "
                  f"(clients: {b.concurrency}): **{ratio:.2f}x** at recall@{workload.k} "
                  f"{ru:.3f} (unified) vs {rb:.3f} (baseline). Goal: at least 3x at equal or "
                  f"better recall: **{'reached' if ratio >= 3 and ru >= rb else 'not reached'}"
                  f"**."]
    if with_history:
        lines += [""] + history_markdown(with_history)
    rel = [os.path.relpath(i, doc.parent) for i in images]
    lines += ["", f"![throughput vs concurrency]({rel[0]})", "",
              f"![latency distribution]({rel[1]})", "", END]
    return "\n".join(lines)


def history_ratios(all_rounds: List[dict], points: List[Point]) -> List[dict]:
    """Every model measured both without history and with N-item histories, at every level:
    the median points of both, and medians over rounds of throughput without / with and p50
    with / without, each pair measured back to back in the same round (> 1: history costs)."""
    median = {(p.model, p.concurrency): p for p in points}
    rows = []
    for p in points:
        base = median.get((served_model(p.model), p.concurrency))
        if not p.history or base is None or base.history:
            continue
        by_round: Dict[int, Dict[str, dict]] = {}
        for r in all_rounds:
            if r["concurrency"] == p.concurrency and r["model"] in (base.model, p.model):
                by_round.setdefault(r["round"], {})[r["model"]] = r
        pairs = [(x[base.model], x[p.model]) for x in by_round.values()
                 if base.model in x and p.model in x]
        throughput = [a["requests_per_s"] / b["requests_per_s"] for a, b in pairs
                      if b["requests_per_s"] > 0]
        p50 = [b["p50_ms"] / a["p50_ms"] for a, b in pairs if a["p50_ms"] > 0]
        ratio = {"throughput": float(np.median(throughput)) if throughput else float("nan"),
                 "p50": float(np.median(p50)) if p50 else float("nan")}
        rows.append({
            "model": base.model, "history": p.history, "concurrency": p.concurrency,
            "requests_per_s_without": base.requests_per_s, "requests_per_s_with": p.requests_per_s,
            "throughput_ratio": ratio["throughput"],  # without / with
            "p50_ms_without": base.p50_ms, "p50_ms_with": p.p50_ms,
            "p50_ratio": ratio["p50"],  # with / without
            "within_bound": bool(ratio["throughput"] <= HISTORY_BOUND
                                 and ratio["p50"] <= HISTORY_BOUND),
            "paired_rounds": len(pairs)})
    order = list(dict.fromkeys(p.model for p in points))  # the models in the order they ran
    return sorted(rows, key=lambda r: (order.index(r["model"]), r["history"], r["concurrency"]))


def history_markdown(rows: List[dict]) -> List[str]:
    """The with-against-without table of history_ratios and the verdict at 16 clients."""
    lines = ["### Request history: with against without (same run)", "",
             "Each model that takes the `history` input is measured without one and with "
             "N-item histories (`<model>+history<N>`, as variants taking turns with the others "
             "at every level and round). Ratios are medians over rounds of pairs measured back "
             "to back in the same round: throughput without / with, p50 with / without (above "
             "1: history costs). p50 values are Locust's rounded ones (whole ms below 100 ms, "
             f"10 ms steps above). Goal (issue 17): at {HISTORY_CLIENTS} clients, throughput "
             f"and p50 with history within {HISTORY_BOUND:g}x of without.", "",
             "| model | history | clients | req/s without | req/s with | without / with | "
             "p50 ms without | p50 ms with | with / without | both within "
             f"{HISTORY_BOUND:g}x |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['history']} | {r['concurrency']} | "
                     f"{r['requests_per_s_without']:.1f} | {r['requests_per_s_with']:.1f} | "
                     f"{r['throughput_ratio']:.2f}x | {r['p50_ms_without']:.0f} | "
                     f"{r['p50_ms_with']:.0f} | {r['p50_ratio']:.2f}x | "
                     f"{'yes' if r['within_bound'] else 'no'} |")
    at = [r for r in rows if r["concurrency"] == HISTORY_CLIENTS]
    if at:
        verdicts = "; ".join(
            f"{r['model']} with {r['history']}-item histories: throughput "
            f"{r['throughput_ratio']:.2f}x, p50 {r['p50_ratio']:.2f}x, "
            f"**{'reached' if r['within_bound'] else 'not reached'}**" for r in at)
        lines += ["", f"At {HISTORY_CLIENTS} clients: {verdicts}."]
    else:
        lines += ["", f"{HISTORY_CLIENTS} clients were not measured in this run "
                  "(--concurrency): no verdict on the goal."]
    return lines


def _paired_ratios(all_rounds: List[dict], concurrency: int, num: str = "unified",
                   den: str = "baseline"):
    """Medians over rounds of num / den, each pair measured back to back in the same round:
    throughput, and throughput per server core (NaN when the run has no such pair)."""
    by_round: Dict[int, Dict[str, dict]] = {}
    for r in all_rounds:
        if r["concurrency"] == concurrency:
            by_round.setdefault(r["round"], {})[r["model"]] = r
    pairs = [(x[num], x[den]) for x in by_round.values()
             if num in x and den in x and x[den]["requests_per_s"] > 0]
    if not pairs:
        return float("nan"), float("nan")

    def core(r):
        return r["requests_per_s"] / max(r["server_cores"], 1e-9)

    return (float(np.median([u["requests_per_s"] / b["requests_per_s"] for u, b in pairs])),
            float(np.median([core(u) / core(b) for u, b in pairs])))


def _per_core(p: Point) -> float:
    return p.requests_per_s / max(p.server_cores, 1e-9)


def write_section(doc: Path, title: str, generated: str) -> None:
    """This benchmark's block of section `title` (benchmarks/doc_sections.py)."""
    doc_sections.write_section(doc, title, generated, BEGIN, END)


# --- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=WorldConfig.num_items)
    p.add_argument("--repository", type=Path, default=None,
                   help="serve this built repository (its items.csv: --items-csv) instead of "
                        "building one from the checked-out code into runs/benchmark/")
    p.add_argument("--items-csv", type=Path, default=None)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--concurrency", default="1,4,16,32,64", help="closed-loop clients per point")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per (model, level); the median round (by throughput) counts")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured time per point")
    p.add_argument("--mix", default="mixed", help="request mix (loadtest/workload.py)")
    p.add_argument("--history", default="0", metavar="N[,N...]",
                   help="item ids in the history input of the measured requests, drawn from "
                        "the catalog (Locust's --triton-history), 0 to "
                        f"{MAX_HISTORY}; several sizes (e.g. 0,100) measure every model at "
                        "each, as variants <model>+history<N> taking turns like models, and "
                        "report with / without ratios (sizes > 0 next to 0). unified and "
                        "retrieval take histories; the baseline has no history input and is "
                        "measured at 0 only, so with baseline among --models the sizes must "
                        "include 0. Recall is measured without history, as the exact "
                        "reference takes none. A run with a size above 0 writes its own "
                        "section and plots (*-history.png). Default 0: no history input")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--recall-queries", type=int, default=50, help="per request kind")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--out", type=Path, default=OUT,
                   help="results.json, the server log and (when this run builds) the repository")
    p.add_argument("--no-docs", action="store_true", help="only <out>/results.json")
    p.add_argument("--no-match-recall", dest="match_recall", action="store_false",
                   help="serve the baseline at its built nprobe instead of the smallest nprobe "
                        "that reaches unified's recall (the default, when this run builds "
                        "and measures the baseline)")
    p.add_argument("--gpu", action="store_true",
                   help="a GPU host run (the Dockerfile image): checks that CUDA is visible, "
                        "writes its own section and plots (*-gpu.png)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]
    try:
        sizes = parse_history_sizes(args.history, MAX_HISTORY)
    except ValueError as e:
        p.error(f"--history: {e}")
    if "baseline" in models and 0 not in sizes:
        p.error("--history: the baseline model takes no history input; measure the models "
                "that do, e.g. --models unified,retrieval, or include size 0 (e.g. "
                f"--history 0,{args.history}): the baseline is measured at 0 only")
    variants = [(m, n) for m in models for n in sizes if n == 0 or m != "baseline"]
    width = max(len(variant(m, n)) for m, n in variants)

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA device visible to torch; run it in the Dockerfile image with "
                  "`docker run --gpus all`", file=sys.stderr)
            return 2
    info = machine()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.repository is None:
        repository, items_csv = out / "model_repository", out / "items.csv"
        print(f"building {args.num_items:,} items into {repository} ...", flush=True)
        build(BuildConfig(world=WorldConfig(num_items=args.num_items), repository=repository,
                          items_csv=items_csv))
    else:
        repository = args.repository
        items_csv = args.items_csv or ROOT / "build" / "items.csv"
        args.match_recall = False  # never rewrite a repository this run did not build
        if not is_built(repository):
            print(f"{repository} is not fully built (python -m builder)", file=sys.stderr)
            return 2
    workload = Workload.from_catalog(items_csv, args.mix, args.k)
    print(workload.describe(), flush=True)
    queries = workload.evaluation_set(args.recall_queries, seed=1)  # no history: see --history
    try:
        loads = {n: workload.with_history(n) for n in sizes}  # the requests Locust sends
    except ValueError as e:
        print(f"--history: {e}", file=sys.stderr)
        return 2
    for n in sizes:
        if n:
            print(loads[n].describe().splitlines()[-1], flush=True)
    t0 = time.perf_counter()
    exact = exact_results(repository, queries)
    print(f"exact reference for {len(queries)} queries in {time.perf_counter() - t0:.0f} s",
          flush=True)
    matched: Dict[str, float] = {}
    if args.match_recall and "baseline" in models:  # (nothing to match without it)
        matched = match_baseline_recall(repository, queries, exact)
        print("baseline matched to unified's recall: " + ", ".join(
            f"{k} {v:.3f}" for k, v in matched.items()), flush=True)
    costs = stage_costs(repository, queries)
    for name, ms in costs.items():
        print(f"CPU ms/query {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()),
              flush=True)

    http, grpc, metrics_port = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc,
                          metrics_port=metrics_port, log_path=out / "tritonserver.log")
    points: List[Point] = []  # the median round of every (model, level)
    all_rounds: List[dict] = []
    recalls: Dict[str, Dict[str, float]] = {}
    with TritonServer(config) as server:
        cpu = CpuMeter(server.process.pid)
        for m in models:
            recalls[m] = recall(server, m, queries, exact)
            print(f"recall@{args.k} {m}: " + ", ".join(f"{k} {v:.3f}"
                                                      for k, v in recalls[m].items()), flush=True)
        for c in levels:
            rounds: Dict[str, List[Point]] = {variant(m, n): [] for m, n in variants}
            for r in range(args.rounds):
                for m, n in variants:  # models (and history sizes) take turns at every
                    point = drive(server, loads[n], m, c, args.protocol,  # level, every round
                                  args.warmup, args.seconds, cpu)
                    rounds[point.model].append(point)
                    all_rounds.append({**asdict(point), "round": r})
                    print(f"round {r + 1}: {point.model:>{width}} x{c:<3} "
                          f"{point.requests_per_s:8.1f} req/s  "
                          f"p50 {point.p50_ms:.0f} p95 {point.p95_ms:.0f} p99 "
                          f"{point.p99_ms:.0f} ms  failures {point.failures}  batch "
                          f"{point.batch_sizes}  cpu server {point.server_cores} client "
                          f"{point.client_cores} other {point.other_cores}", flush=True)
            for mine in rounds.values():
                ranked = sorted(mine, key=lambda p: p.requests_per_s)
                points.append(ranked[len(ranked) // 2])
    with_history = history_ratios(all_rounds, points)
    for row in with_history:
        print(f"history {row['model']} +{row['history']} x{row['concurrency']}: throughput "
              f"without / with {row['throughput_ratio']:.2f}x, p50 with / without "
              f"{row['p50_ratio']:.2f}x", flush=True)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "recall": recalls, "baseline_recall_match": matched, "cpu_ms_per_query": costs,
               "points": [asdict(p) for p in points], "rounds": all_rounds,
               "history": with_history}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")
    if args.no_docs:
        return 0
    suffix = ("-gpu" if args.gpu else "") + ("-history" if any(sizes) else "")
    images = plots(points, args.img, suffix)
    title = {(False, False): SECTION, (True, False): GPU_SECTION,
             (False, True): HISTORY_SECTION, (True, True): GPU_HISTORY_SECTION}
    write_section(args.doc, title[args.gpu, any(sizes)],
                  markdown(args, info, workload, sizes, recalls, matched, costs, points,
                           all_rounds, with_history, images, args.doc))
    print(f"wrote {args.doc} and {', '.join(str(i) for i in images)}")
    failures = sum(p["failures"] for p in all_rounds)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
