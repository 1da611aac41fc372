"""Feature filter (issue 3): the served CPU path against a naive exact evaluation.

For --queries seeded random filter expressions (filtering/random_filters.py: AND, OR, NOT up
to --max-depth levels, values drawn from random items) over the synthetic catalog of
--num-items items, prints:
- the query time of the served filter layer (TorchScript `BloomFilterLayer`: resolve, the
  `iam::bloom_search` torch path, exact check), whole batch, median and best of --repeats, with
  its parts; and of the naive exact evaluation (`ExactFeatureFilter`, a scan of the dense
  feature matrix per term);
- index bytes per item, by part;
- the Bloom false-positive rate before the exact step: per Bloom term (single-term queries
  over Bloom-mode values) and per query of the batch (items the op leaves possible that do
  not match, over the items that do not match), and the uncertain pairs the exact step decides;
- the anchor's setting (every feature in one Bloom filter, K=3, width multiplier 5) on the same
  catalog: bytes per item, its false positives for a rare creator and its false negatives for
  NOT language:pt if the Bloom answer were served, next to ours.
Parsing (once per request, in the runner) is timed separately.

    .venv/bin/python benchmarks/filter_benchmark.py            # the issue's setting
    .venv/bin/python benchmarks/filter_benchmark.py --quick    # 20k items, seconds
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filtering.bits import popcount  # noqa: E402
from filtering.bloom_index import BloomIndexConfig, build_bloom_index  # noqa: E402
from filtering.expression import batch_plans, parse_plan, to_string  # noqa: E402
from filtering.random_filters import random_expression  # noqa: E402
from kernels.bloom_search import bloom_search_torch  # noqa: E402
from stages.filter import (  # noqa: E402
    BloomFilterLayer,
    ExactFeatureFilter,
    feature_matrix,
)
from world.synthetic import WorldConfig, generate_world  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--max-depth", type=int, default=2,
                    help="expression tree depth (2: ~2.2 terms per query, 3: ~4.1)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (model_repository/filter/config.pbtxt: torch_threads)")
    ap.add_argument("--seed", type=int, default=0)
    defaults = BloomIndexConfig()
    ap.add_argument("--exact-max-values", type=int, default=defaults.exact_max_values)
    ap.add_argument("--exact-min-share", type=float, default=defaults.exact_min_share)
    ap.add_argument("--num-hashes", type=int, default=defaults.num_hashes)
    ap.add_argument("--width-multiplier", type=float, default=defaults.width_multiplier)
    ap.add_argument("--quick", action="store_true", help="20k items, 5 repeats")
    args = ap.parse_args()
    if args.quick:
        args.num_items, args.repeats = 20_000, 5
    return args


def timed(fn, repeats: int, warmup: int = 3):
    """(median ms, best ms) of `repeats` calls after `warmup` calls (TorchScript profiles a
    function's first two calls and optimizes it after them)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def false_positive_rate(definite, uncertain, truth, num_items: int) -> float:
    """Items the op leaves possible that do not match, over the items that do not match."""
    wrong = int(popcount((definite | uncertain) & ~truth).sum())
    negatives = truth.shape[0] * num_items - int(popcount(truth).sum())
    return wrong / max(negatives, 1)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    catalog = generate_world(WorldConfig(seed=args.seed, num_items=args.num_items,
                                         num_users=100, impressions_per_user=1)).catalog
    n, schema = catalog.num_items, catalog.schema
    print(f"catalog: {n:,} items, synthetic world seed {args.seed} "
          f"({time.perf_counter() - started:.1f} s); torch threads {args.threads}")

    config = BloomIndexConfig(exact_max_values=args.exact_max_values,
                              exact_min_share=args.exact_min_share, num_hashes=args.num_hashes,
                              width_multiplier=args.width_multiplier)
    started = time.perf_counter()
    index = build_bloom_index(schema, catalog.features, config)
    layer = BloomFilterLayer(index).eval()
    scripted = torch.jit.script(layer)
    naive = torch.jit.script(ExactFeatureFilter(*feature_matrix(catalog)).eval())
    print(f"index: {config} built in {time.perf_counter() - started:.1f} s; "
          f"modes {index.modes}, {index.num_exact_rows} bitmaps, Bloom width {index.width}")
    sizes = index.bytes_per_item()
    print("bytes per item: " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))

    rng = random.Random(args.seed)
    texts = [to_string(random_expression(rng, schema, catalog.features, args.max_depth), schema)
             for _ in range(args.queries)]
    started = time.perf_counter()
    plan_list = [parse_plan(t, schema) for t in texts]
    parse_us = (time.perf_counter() - started) * 1e6 / len(texts)
    plans = batch_plans(plan_list)
    terms = float((plans[:, :, 0] == 1).sum(1).float().mean())
    print(f"queries: {len(texts)}, max depth {args.max_depth}, {terms:.1f} terms and "
          f"{float((plans[:, :, 0] != 0).sum(1).float().mean()):.1f} plan rows on average; "
          f"parsing {parse_us:.0f} us per request; e.g. {texts[0]!r}")

    with torch.inference_mode():
        truth = naive(plans)
        served = scripted(plans)
        assert torch.equal(served, truth), "the served filter is not exact"
        resolved = scripted.resolve(plans)
        definite, uncertain = bloom_search_torch(resolved, layer.words, n)
        queries = (resolved[:, :, 1] == 2).any(1).nonzero().squeeze(1)

        ours = timed(lambda: scripted(plans), args.repeats)
        parts = {
            "resolve": timed(lambda: scripted.resolve(plans), args.repeats),
            "bloom_search": timed(lambda: torch.ops.iam.bloom_search(resolved, layer.words, n),
                                  args.repeats),
            "exact check": timed(lambda: scripted.check_uncertain(
                plans, resolved, queries, definite.clone(), uncertain), args.repeats),
        }
        copy = timed(lambda: definite.clone(), args.repeats)[0]
        parts["exact check"] = tuple(t - copy for t in parts["exact check"])
        naive_ms = timed(lambda: naive(plans), 1, warmup=0)
        print(f"\nCPU query time for {len(texts)} queries over {n:,} items (ms, median / best):")
        print(f"  served layer (TorchScript)    {ours[0]:8.2f} / {ours[1]:.2f}   "
              + ", ".join(f"{k} {v[0]:.2f}" for k, v in parts.items())
              + f" (the check's time less {copy:.2f} ms for copying the bitmaps it changes)")
        print(f"  naive exact (feature matrix)  {naive_ms[0]:8.2f} / {naive_ms[1]:.2f}")

        # Bloom false positives before the exact step
        batch_fp = false_positive_rate(definite, uncertain, truth, n)
        print(f"\nBloom false-positive rate before the exact step: {batch_fp:.2e} of the "
              f"non-matching items per query of the batch; {int(popcount(uncertain).sum()):,} "
              f"uncertain (query, item) pairs checked, {len(queries)} queries with Bloom terms")
        bloom_values = sorted(set(catalog.features[2][:, 0].tolist())
                              - set(index.exact_values.tolist()))
        sample = random.Random(1).sample(bloom_values, min(200, len(bloom_values)))
        if sample:
            single = batch_plans([parse_plan(f"creator:{v}", schema) for v in sample])
            d, u = bloom_search_torch(scripted.resolve(single), layer.words, n)
            term_fp = false_positive_rate(d, u, naive(single), n)
            print(f"  per Bloom term (creator values without a bitmap, {len(sample)} sampled): "
                  f"{term_fp:.2e}, {term_fp * n:.0f} false positives per term at {n:,} items")

        # the anchor's setting on the same catalog
        anchor = BloomIndexConfig(exact_max_values=0, exact_min_share=2.0, num_hashes=3,
                                  width_multiplier=5.0)
        anchor_layer = BloomFilterLayer(build_bloom_index(schema, catalog.features, anchor))
        cases = batch_plans([parse_plan(t, schema) for t in ("creator:42", "NOT language:pt")])
        d, u = bloom_search_torch(anchor_layer.resolve(cases), anchor_layer.words, n)
        want = naive(cases)
        ours_cases = anchor_layer(cases)
        matches = popcount(want).tolist()
        print(f"\nanchor setting (K=3, width multiplier 5, one Bloom filter for all features): "
              f"{anchor_layer.bloom_width} bits = "
              f"{anchor_layer.bloom_width * anchor_layer.num_words * 8 / n:.2f} bytes per item")
        print(f"  creator:42: {matches[0]} true matches; the Bloom filter lets "
              f"{int(popcount(d[0] | u[0]))} through; served: {int(popcount(ours_cases[0]))}, "
              f"exact: {torch.equal(ours_cases[0], want[0])}")
        print(f"  NOT language:pt: {matches[1]:,} true matches; NOT over the Bloom answer "
              f"would drop {int(popcount(want[1] & ~d[1])):,} of them; served: "
              f"{int(popcount(ours_cases[1])):,}, exact: {torch.equal(ours_cases[1], want[1])}")


if __name__ == "__main__":
    main()
