"""Filtered IVF int8 search as a TorchScript module: probe planning around `iam::ivf_int8_search`.

A filter that passes a fraction s of the items leaves, in nprobe lists, about
s * nprobe * mean_list_size candidates; the filtered top-k of a query are roughly its unfiltered
top-(k / s). So the planner widens the probe per query until the probed lists are expected to
hold `min_candidates * k` passing items (`min_candidates` plays the role of nprobe, made
selectivity-aware); when that reaches `exact_fraction` of all lists it scans every list instead
(exact filtered search over the passing items, which for a selective filter is cheap because the
scan touches only passing rows). A query whose probed lists held fewer than k passing rows is
re-run exactly, so k results come back whenever k items pass.
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

import kernels  # noqa: F401  (registers torch.ops.iam.ivf_int8_search)
from ann.ivf import IVFIndex, dequantize_int8, quantize_int8
from filtering.bits import popcount

# the planner estimates a filter's pass rate from every SAMPLE_STRIDE-th filter word: a full
# popcount of a [64, 15625] bitmap costs more than the whole search on the 2-core benchmark
# machine. 1/32 of the words (31k items) estimates a 0.5 % filter within ~8 % (one standard
# deviation), a 10 % one within ~2 %, which moves the planned probe by as much; 1/8 cost ~1.4 ms
# per batch of 64 (torch's int64 shifts are not vectorized), 15 % of an unfiltered search with
# the compiled scan (docs/performance.md, "Fused int8 ANN").
SAMPLE_STRIDE = 32


def estimate_pass_rate(filter_bits: torch.Tensor, num_items: int, stride: int) -> torch.Tensor:
    """Fraction of items passing each query's filter (float32 [B]), from every stride-th word."""
    sample = filter_bits[:, ::stride].contiguous()
    sampled_bits = min(sample.shape[1] * 64, num_items)
    return popcount(sample).to(torch.float32) / float(max(sampled_bits, 1))


@dataclass
class IVFSearchConfig:
    # Defaults from benchmarks/ann_benchmark.py on the 1M-item world catalog (nlist 1000,
    # k=100, docs/performance.md): recall@100 against exact fp32 filtered search with
    # nprobe = min_candidates = 40 / 48 / 64 was 0.959 / 0.968 / 0.976 unfiltered and
    # 0.931 / 0.950 / 0.968 with a 10 % filter; a 0.5 % filter plans an exact scan (0.992).
    # lists probed per query at least (what an unfiltered query gets)
    nprobe: int = 64
    # probe until the probed lists are expected to hold this many passing items per result
    # (with a 10 % filter and ~1000-item lists, 64 means 64 lists)
    min_candidates: float = 64.0
    # scan all lists (exact) once the planned probe reaches this fraction of them: the scan
    # then reads every filter word but scores only passing rows
    exact_fraction: float = 0.35


def mean_norm(codes: torch.Tensor, scales: torch.Tensor, chunk: int = 1 << 20) -> float:
    """The mean L2 norm of the int8 vectors scale * code (1.0 for an empty or all-zero
    index), `chunk` rows at a time."""
    total = 0.0
    for s in range(0, codes.shape[0], chunk):
        rows = dequantize_int8(codes[s: s + chunk], scales[s: s + chunk])
        total += float(rows.norm(dim=1).double().sum())
    mean = total / max(int(codes.shape[0]), 1)
    return mean if mean > 0 else 1.0


class IVFInt8Search(nn.Module):
    """Filtered int8 inner-product search over an IVF index (drop-in for exact search).

    Args:
        index: the IVF int8 index (its tensors become buffers of this module).
        config: probe planning defaults; `forward` can override them per call.
    """

    def __init__(self, index: IVFIndex, config: IVFSearchConfig = IVFSearchConfig()):
        super().__init__()
        self.register_buffer("centroids", index.centroids.float().contiguous())
        self.register_buffer("list_offsets", index.list_offsets.to(torch.int64).contiguous())
        self.register_buffer("codes", index.codes.contiguous())
        self.register_buffer("scales", index.scales.float().contiguous())
        self.nprobe = config.nprobe
        self.min_candidates = config.min_candidates
        self.exact_fraction = config.exact_fraction
        self.sample_stride = SAMPLE_STRIDE
        self.norm_scale = mean_norm(self.codes, self.scales)

    def plan_nprobe(self, pass_rate: torch.Tensor, k: int, nprobe: int, min_candidates: float
                    ) -> torch.Tensor:
        """Lists to probe per query (int64 [B]) for filters passing `pass_rate` of the items;
        nlist means an exact scan."""
        nlist = self.centroids.shape[0]
        n = self.codes.shape[0]
        passing = pass_rate * n
        expected_per_list = passing / nlist
        wanted = min_candidates * k
        need = torch.ceil(wanted / torch.clamp(expected_per_list, min=1e-9))
        need = torch.clamp(need, max=float(nlist)).to(torch.int64)
        planned = torch.clamp(torch.clamp(need, min=nprobe), max=nlist)
        go_exact = planned.to(torch.float32) >= self.exact_fraction * nlist
        # a tiny filter or a tiny index: one scan of everything is as cheap and exact
        go_exact = go_exact | (passing <= wanted)
        if n <= k:
            go_exact = torch.ones_like(go_exact)
        return torch.where(go_exact, torch.full_like(planned, nlist), planned)

    def list_affinity(self, queries: torch.Tensor) -> torch.Tensor:
        """How promising each list is for each query (float32 [B, nlist], higher first): minus
        the squared L2 distance from s q^ to the centroid over 2 s, up to a per-query constant,
        i.e. q^ . c - |c|^2 / (2 s), with s the items' mean norm (`norm_scale`): the query's
        direction at the length of a typical item. `ann.ivf` assigns items to lists by L2, so
        this ranks lists as the query's own assignment would; ranking by q . c alone favours
        long centroids and needed 48 lists for the recall@100 that this reaches with 40
        (docs/performance.md, "Fused int8 ANN"). Without s (the unit query itself) the ranking
        holds only for unit-length items: on the synthetic world's latent vectors (mean norm
        about 4) it favoured short centroids, and recall@10 of the true vectors fell from 0.22
        (exact search) to 0.05. Scaling every item by a scales s alike: the ranking does not
        change."""
        unit = torch.nn.functional.normalize(queries, dim=1)
        half_sq_norm = 0.5 * (self.centroids * self.centroids).sum(1) / self.norm_scale
        return unit @ self.centroids.T - half_sq_norm[None, :]

    def forward(self, queries: torch.Tensor, filter_bits: torch.Tensor, num_candidates: int,
                nprobe: int = -1, min_candidates: float = -1.0
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: float32 [B, D]; filter_bits: int64 [B, W] in index row order;
            num_candidates: results per query; nprobe / min_candidates: per-call overrides
            (-1 = the configured default).
        Returns:
            scores float32 [B, C] (descending, -inf past a query's matches), rows int64 [B, C]
            (-1 past a query's matches), C = min(num_candidates, N).
        """
        nlist = self.centroids.shape[0]
        k = min(num_candidates, self.codes.shape[0])
        nprobe = self.nprobe if nprobe < 0 else nprobe
        min_candidates = self.min_candidates if min_candidates < 0 else min_candidates
        b = queries.shape[0]
        query_codes, query_scales = quantize_int8(queries)
        pass_rate = estimate_pass_rate(filter_bits, self.codes.shape[0], self.sample_stride)
        planned = self.plan_nprobe(pass_rate, k, nprobe, min_candidates)
        scores = torch.full((b, k), float("-inf"), device=queries.device)
        rows = torch.full((b, k), -1, dtype=torch.int64, device=queries.device)
        exact = planned >= nlist

        probing = (~exact).nonzero().squeeze(1)
        if probing.numel() > 0:
            # the usual case, every query probing: no copies of the [B, W] bitmap (8 MB for
            # 64 queries over 1M items, ~5 % of an unfiltered search's time)
            everyone = probing.numel() == b
            p_queries = queries if everyone else queries[probing]
            p_planned = planned if everyone else planned[probing]
            p_codes = query_codes if everyone else query_codes[probing]
            p_scales = query_scales if everyone else query_scales[probing]
            p_bits = filter_bits if everyone else filter_bits[probing]
            p_max = int(p_planned.max())
            probes = torch.topk(self.list_affinity(p_queries), p_max, dim=1).indices
            slot = torch.arange(p_max, device=queries.device)
            probes = torch.where(slot[None, :] < p_planned[:, None], probes, -1)
            s, r, found = torch.ops.iam.ivf_int8_search(
                p_codes, p_scales, p_bits, probes, self.list_offsets, self.codes, self.scales, k)
            if everyone:
                scores, rows = s, r
            else:
                scores[probing] = s
                rows[probing] = r
            # fewer than k passing rows in the probed lists: scan everything (cheap, since
            # then the filter is selective; a query with < k matches in all gets them all)
            exact[probing[found < k]] = True

        scanning = exact.nonzero().squeeze(1)
        if scanning.numel() > 0:
            all_lists = torch.arange(nlist, device=queries.device)
            probes = all_lists[None, :].expand(scanning.numel(), nlist).contiguous()
            s, r, _ = torch.ops.iam.ivf_int8_search(
                query_codes[scanning], query_scales[scanning], filter_bits[scanning], probes,
                self.list_offsets, self.codes, self.scales, k)
            scores[scanning] = s
            rows[scanning] = r
        return scores, rows
