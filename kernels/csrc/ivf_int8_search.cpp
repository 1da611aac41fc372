// CPU implementation of `iam::ivf_int8_search` (kernels/ivf_int8_search.py has the contract and
// the plain-torch reference). One thread, one pass over each probed list per batch:
//
//   1. the batch's (query, list) probe pairs are grouped by list (counting sort), so each probed
//      list is read once, while it is in cache, for every query that probes it;
//   2. per pair, the filter words covering the list (masked to its row range) are popcounted:
//      that is num_passing, exactly, and it sizes each query's top-k buffer;
//   3. each (query, list) pair walks the nonzero bytes of its masked filter words: a byte (8
//      consecutive rows) with >= block_min_bits passing rows is scored as a block (8 dot
//      products, horizontally summed together, rescaled and compared with the threshold in one
//      vector; filtered-out lanes dropped), a sparser byte row by row. Dense lists (no filter)
//      are thus read 8 rows at a time, selective ones touch only their passing rows. Two
//      queries of the same list are scored as a pair instead (pair_queries): 4 rows at a time,
//      each row loaded once for both, [4 dots of a | 4 dots of b] in one vector;
//   4. score = float(dot) * query_scale * item_scale with the dot an exact integer, in the torch
//      path's float order (built with -ffp-contract=off: no fused multiply-add), so scores are
//      bit-identical to it; a per-query buffer keeps candidates above a threshold (the k-th best
//      after the last compaction by nth_element), then the k best are sorted out.
//
// Built three times by kernels/build_ext.py: with -mavx2 -mavxvnni (vpdpbusd: 32 byte products
// per instruction), with -mavx2 (int8 -> int16 widening and _mm256_madd_epi16), both exact for
// every int8 value, -128 included; and without (portable loops); the loader picks the fastest
// build the CPU runs. Each build is its own shared library, so no inline function compiled for
// AVX2 can be shared with the portable one.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

struct Candidate {
  float score;
  int64_t row;
};

// descending score; ties by ascending row (any order of tied rows is allowed by the contract)
inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.row < b.row);
}

// One query's best rows so far: an unsorted buffer of `cap` slots (cap > k). Until the buffer
// first fills, every passing row is kept; after that only rows scoring above `threshold`, the
// k-th best score at the last compaction.
struct TopK {
  Candidate* buf = nullptr;
  int64_t count = 0;
  int64_t cap = 0;
  int64_t k = 0;
  float threshold = 0.0f;
  bool full = false;

  inline bool wants(float score) const { return !full || score > threshold; }

  inline void push(float score, int64_t row) {
    buf[count++] = Candidate{score, row};
    if (count == cap) compact();
  }

  void compact() {
    std::nth_element(buf, buf + (k - 1), buf + count, better);
    count = k;
    threshold = buf[k - 1].score;  // nth_element leaves no worse candidate before it
    full = true;
  }

  void write(float* scores, int64_t* rows) {
    int64_t kept = std::min(count, k);
    if (count > k) std::nth_element(buf, buf + (k - 1), buf + count, better);
    std::sort(buf, buf + kept, better);
    for (int64_t i = 0; i < kept; ++i) {
      scores[i] = buf[i].score;
      rows[i] = buf[i].row;
    }
    for (int64_t i = kept; i < k; ++i) {
      scores[i] = -__builtin_inff();
      rows[i] = -1;
    }
  }
};

#ifdef __AVX2__
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// Exact integer dot product of one int8 row with a query widened to int16 (zero-padded to a
// multiple of 16 lanes).
inline int32_t dot_row(const int8_t* row, const int16_t* q, const int8_t* q8, int32_t q8_bias,
                       int64_t d) {
  (void)q8, (void)q8_bias;  // the AVX-VNNI build's
  int64_t i = 0;
  int32_t out = 0;
#if defined(__AVXVNNI__)
  // vpdpbusd multiplies unsigned by signed bytes: (row + 128) . q - 128 * sum(q) = row . q,
  // exact for every int8 value (no saturation: vpdpbusd, not vpdpbusds)
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  __m256i acc = _mm256_setzero_si256();
  for (; i + 32 <= d; i += 32) {
    __m256i x = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)), flip);
    acc = _mm256_dpbusd_avx_epi32(acc, x, _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(q8 + i)));
  }
  out = hsum_epi32(acc) - q8_bias;
#elif defined(__AVX2__)
  __m256i acc = _mm256_setzero_si256();
  for (; i + 16 <= d; i += 16) {
    __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
        x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i))));
  }
  out = hsum_epi32(acc);
#endif
  for (; i < d; ++i) out += int32_t(row[i]) * int32_t(q[i]);
  return out;
}

// Exact dot products of 8 consecutive rows with one query: out[r] = rows[r] . q.
inline void dot_block8(const int8_t* rows, const int16_t* q, const int8_t* q8, int32_t q8_bias,
                       int64_t d, int32_t* out) {
  (void)q8, (void)q8_bias;  // the AVX-VNNI build's
  int64_t i = 0;
#ifdef __AVX2__
  // one accumulator per row; the query chunk is loaded once for the 8 rows
  __m256i acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();
#if defined(__AVXVNNI__)
  const __m256i flip = _mm256_set1_epi8(char(0x80));  // as in dot_row
  for (; i + 32 <= d; i += 32) {
    __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + i));
    for (int r = 0; r < 8; ++r) {
      __m256i x = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * d + i)), flip);
      acc[r] = _mm256_dpbusd_avx_epi32(acc[r], x, qv);
    }
  }
  const __m256i bias = _mm256_set1_epi32(q8_bias);
#else
  const __m256i bias = _mm256_setzero_si256();
#endif
  for (; i + 16 <= d; i += 16) {
    __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
    for (int r = 0; r < 8; ++r) {
      __m256i x = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * d + i)));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(x, qv));
    }
  }
  // 8 horizontal sums at once: hadd pairs, then add the two 128-bit halves -> lane r = row r
  __m256i s01 = _mm256_hadd_epi32(acc[0], acc[1]), s23 = _mm256_hadd_epi32(acc[2], acc[3]);
  __m256i s45 = _mm256_hadd_epi32(acc[4], acc[5]), s67 = _mm256_hadd_epi32(acc[6], acc[7]);
  __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
  __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                                  _mm256_permute2x128_si256(s0123, s4567, 0x31));
  sums = _mm256_sub_epi32(sums, bias);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sums);
#else
  for (int r = 0; r < 8; ++r) out[r] = 0;
#endif
  for (; i < d; ++i)
    for (int r = 0; r < 8; ++r) out[r] += int32_t(rows[r * d + i]) * int32_t(q[i]);
}

// Exact dot products of 4 consecutive rows with two queries a and b: out = [rows . a | rows . b].
// Each row is loaded (and, for AVX-VNNI, offset) once for both queries.
inline void dot_block4x2(const int8_t* rows, const int16_t* qa, const int8_t* qa8,
                         int32_t qa8_bias, const int16_t* qb, const int8_t* qb8, int32_t qb8_bias,
                         int64_t d, int32_t* out) {
  (void)qa8, (void)qa8_bias, (void)qb8, (void)qb8_bias;  // the AVX-VNNI build's
  int64_t i = 0;
#ifdef __AVX2__
  __m256i a[4], b[4];
  for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm256_setzero_si256();
#if defined(__AVXVNNI__)
  const __m256i flip = _mm256_set1_epi8(char(0x80));  // as in dot_row
  for (; i + 32 <= d; i += 32) {
    __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa8 + i));
    __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb8 + i));
    for (int r = 0; r < 4; ++r) {
      __m256i x = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * d + i)), flip);
      a[r] = _mm256_dpbusd_avx_epi32(a[r], x, va);
      b[r] = _mm256_dpbusd_avx_epi32(b[r], x, vb);
    }
  }
  const __m256i bias = _mm256_setr_epi32(qa8_bias, qa8_bias, qa8_bias, qa8_bias,
                                         qb8_bias, qb8_bias, qb8_bias, qb8_bias);
#else
  const __m256i bias = _mm256_setzero_si256();
#endif
  for (; i + 16 <= d; i += 16) {
    __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + i));
    __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + i));
    for (int r = 0; r < 4; ++r) {
      __m256i x = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * d + i)));
      a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(x, va));
      b[r] = _mm256_add_epi32(b[r], _mm256_madd_epi16(x, vb));
    }
  }
  // as in dot_block8: hadd pairs, then add the 128-bit halves -> [a r0..r3 | b r0..r3]
  __m256i sa = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  __m256i sb = _mm256_hadd_epi32(_mm256_hadd_epi32(b[0], b[1]), _mm256_hadd_epi32(b[2], b[3]));
  __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(sa, sb, 0x20),
                                  _mm256_permute2x128_si256(sa, sb, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi32(sums, bias));
#else
  for (int r = 0; r < 8; ++r) out[r] = 0;
#endif
  for (; i < d; ++i)
    for (int r = 0; r < 4; ++r) {
      out[r] += int32_t(rows[r * d + i]) * int32_t(qa[i]);
      out[4 + r] += int32_t(rows[r * d + i]) * int32_t(qb[i]);
    }
}

// bits of word `word` that belong to rows [start, end)
inline uint64_t range_mask(int64_t word, int64_t start, int64_t end) {
  int64_t lo = std::max<int64_t>(start - (word << 6), 0);
  int64_t hi = std::min<int64_t>(end - (word << 6), 64);
  if (hi <= lo) return 0;
  uint64_t upper = hi >= 64 ? ~uint64_t(0) : ((uint64_t(1) << hi) - 1);
  uint64_t lower = (uint64_t(1) << lo) - 1;  // lo < 64 here
  return upper & ~lower;
}

struct Batch {
  const int16_t* qwide;  // [B, d_pad]: int16, zero-padded
  const int8_t* qbytes;  // [B, d_pad]: int8, zero-padded (the AVX-VNNI build)
  const int32_t* qbias;  // [B]: 128 * sum of the query's codes over whole 32-byte chunks
  int64_t d_pad;
  const float* qscales;
  const uint64_t* bits;  // [B, W]
  int64_t W;
  const int8_t* codes;  // [N, D]
  const float* scales;
  int64_t N;
  int64_t D;
  int block_min_bits;
  TopK* topk;
};

// The passing rows of [start, end) for one query, 8 rows (one filter byte) at a time: a byte
// with >= block_min_bits set bits is scored as a block of 8 rows (the others masked off after
// the dot), a sparser one row by row. Zero bytes cost one bit scan.
void scan_list(const Batch& bt, int64_t query, int64_t start, int64_t end) {
  const int16_t* q = bt.qwide + query * bt.d_pad;
  const int8_t* q8 = bt.qbytes + query * bt.d_pad;
  const int32_t q8_bias = bt.qbias[query];
  const uint64_t* bits = bt.bits + query * bt.W;
  const float qs = bt.qscales[query];
  TopK& t = bt.topk[query];
  alignas(32) int32_t dot[8];
  alignas(32) float score[8];
  for (int64_t word = start >> 6; (word << 6) < end; ++word) {
    uint64_t m = bits[word] & range_mask(word, start, end);
    while (m) {
      const int shift = __builtin_ctzll(m) & ~7;  // the lowest nonzero byte
      unsigned byte = unsigned(m >> shift) & 0xffu;
      m &= ~(uint64_t(0xff) << shift);
      const int64_t first = (word << 6) + shift;
      if (__builtin_popcount(byte) >= bt.block_min_bits && first + 8 <= bt.N) {
        dot_block8(bt.codes + first * bt.D, q, q8, q8_bias, bt.D, dot);
#ifdef __AVX2__
        __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(
            reinterpret_cast<const __m256i*>(dot))), _mm256_set1_ps(qs));
        s = _mm256_mul_ps(s, _mm256_loadu_ps(bt.scales + first));
        _mm256_store_ps(score, s);
        if (t.full)  // only lanes above the threshold
          byte &= unsigned(_mm256_movemask_ps(
              _mm256_cmp_ps(s, _mm256_set1_ps(t.threshold), _CMP_GT_OQ)));
#else
        for (int r = 0; r < 8; ++r) {
          score[r] = float(dot[r]) * qs;
          score[r] = score[r] * bt.scales[first + r];
        }
#endif
        while (byte) {
          int r = __builtin_ctz(byte);
          byte &= byte - 1;
          if (t.wants(score[r])) t.push(score[r], first + r);
        }
      } else {
        while (byte) {
          int r = __builtin_ctz(byte);
          byte &= byte - 1;
          float sc = float(dot_row(bt.codes + (first + r) * bt.D, q, q8, q8_bias, bt.D)) * qs;
          sc = sc * bt.scales[first + r];
          if (t.wants(sc)) t.push(sc, first + r);
        }
      }
    }
  }
}

// The passing rows of [start, end) for two queries that probe the same list, 4 rows at a time:
// a group of 4 rows where either query has a passing row is scored for both (one load of each
// row), and each keeps the rows its own filter passes.
void scan_list_pair(const Batch& bt, int64_t qa, int64_t qb, int64_t start, int64_t end) {
  const int16_t* a16 = bt.qwide + qa * bt.d_pad;
  const int16_t* b16 = bt.qwide + qb * bt.d_pad;
  const int8_t* a8 = bt.qbytes + qa * bt.d_pad;
  const int8_t* b8 = bt.qbytes + qb * bt.d_pad;
  const uint64_t* bits_a = bt.bits + qa * bt.W;
  const uint64_t* bits_b = bt.bits + qb * bt.W;
  const float qs_a = bt.qscales[qa], qs_b = bt.qscales[qb];
  TopK& ta = bt.topk[qa];
  TopK& tb = bt.topk[qb];
  alignas(32) int32_t dot[8];
  alignas(32) float score[8];
  for (int64_t word = start >> 6; (word << 6) < end; ++word) {
    const uint64_t keep = range_mask(word, start, end);
    const uint64_t ma = bits_a[word] & keep, mb = bits_b[word] & keep;
    uint64_t any = ma | mb;
    while (any) {
      const int shift = __builtin_ctzll(any) & ~3;  // the lowest nonzero group of 4 rows
      any &= ~(uint64_t(0xf) << shift);
      // lanes 0..3: query a's rows, 4..7: query b's
      unsigned lanes = (unsigned(ma >> shift) & 0xfu) | ((unsigned(mb >> shift) & 0xfu) << 4);
      const int64_t first = (word << 6) + shift;
      if (first + 4 <= bt.N) {
        dot_block4x2(bt.codes + first * bt.D, a16, a8, bt.qbias[qa], b16, b8, bt.qbias[qb],
                     bt.D, dot);
#ifdef __AVX2__
        __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(
            reinterpret_cast<const __m256i*>(dot))), _mm256_setr_ps(
                qs_a, qs_a, qs_a, qs_a, qs_b, qs_b, qs_b, qs_b));
        s = _mm256_mul_ps(s, _mm256_broadcast_ps(
            reinterpret_cast<const __m128*>(bt.scales + first)));
        _mm256_store_ps(score, s);
        if (ta.full || tb.full) {  // only lanes above their query's threshold
          const float inf = __builtin_inff();
          unsigned above = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_setr_ps(
              ta.full ? ta.threshold : -inf, ta.full ? ta.threshold : -inf,
              ta.full ? ta.threshold : -inf, ta.full ? ta.threshold : -inf,
              tb.full ? tb.threshold : -inf, tb.full ? tb.threshold : -inf,
              tb.full ? tb.threshold : -inf, tb.full ? tb.threshold : -inf), _CMP_GT_OQ)));
          lanes &= above | (ta.full ? 0u : 0x0fu) | (tb.full ? 0u : 0xf0u);
        }
#else
        for (int r = 0; r < 8; ++r) {
          score[r] = float(dot[r]) * (r < 4 ? qs_a : qs_b);
          score[r] = score[r] * bt.scales[first + (r & 3)];
        }
#endif
        while (lanes) {
          int lane = __builtin_ctz(lanes);
          lanes &= lanes - 1;
          TopK& t = lane < 4 ? ta : tb;
          if (t.wants(score[lane])) t.push(score[lane], first + (lane & 3));
        }
      } else {  // the index's last rows: no 4 rows to read
        while (lanes) {
          int lane = __builtin_ctz(lanes);
          lanes &= lanes - 1;
          const bool is_a = lane < 4;
          const int64_t row = first + (lane & 3);
          float sc = float(dot_row(bt.codes + row * bt.D, is_a ? a16 : b16, is_a ? a8 : b8,
                                   bt.qbias[is_a ? qa : qb], bt.D)) * (is_a ? qs_a : qs_b);
          sc = sc * bt.scales[row];
          TopK& t = is_a ? ta : tb;
          if (t.wants(sc)) t.push(sc, row);
        }
      }
    }
  }
}

int64_t count_passing(const uint64_t* bits, int64_t start, int64_t end) {
  int64_t n = 0;
  for (int64_t word = start >> 6; (word << 6) < end; ++word)
    n += __builtin_popcountll(bits[word] & range_mask(word, start, end));
  return n;
}

}  // namespace

#define IAM_JOIN2(a, b) a##b
#define IAM_JOIN(a, b) IAM_JOIN2(a, b)

// Returns 0, or: 1 a probe outside [-1, nlist), 2 list_offsets not non-decreasing within [0, N],
// 3 out of memory. Arguments are checked (shapes, dtypes) by the Python wrapper.
extern "C" int64_t IAM_JOIN(iam_ivf_int8_search_, IAM_ISA)(
    const int8_t* query_codes, const float* query_scales, const int64_t* filter_bits, int64_t W,
    const int64_t* probes, int64_t B, int64_t P, const int64_t* list_offsets, int64_t nlist,
    const int8_t* codes, const float* scales, int64_t N, int64_t D, int64_t k,
    int64_t block_min_bits, int64_t pair_queries, float* out_scores, int64_t* out_rows, int64_t* out_num_passing) {
  for (int64_t l = 0; l < nlist; ++l)
    if (list_offsets[l] < 0 || list_offsets[l] > list_offsets[l + 1] || list_offsets[l + 1] > N)
      return 2;
  for (int64_t i = 0; i < B * P; ++i)
    if (probes[i] < -1 || probes[i] >= nlist) return 1;
  try {
    // queries widened once to int16 and copied as int8, zero-padded to whole 32-byte vectors
    int64_t d_pad = (D + 31) / 32 * 32;
    std::vector<int16_t> qwide(B * d_pad, 0);
    std::vector<int8_t> qbytes(B * d_pad, 0);
    std::vector<int32_t> qbias(B, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < D; ++i) {
        qwide[b * d_pad + i] = qbytes[b * d_pad + i] = query_codes[b * D + i];
        if (i < D / 32 * 32) qbias[b] += 128 * int32_t(query_codes[b * D + i]);
      }

    // probe pairs grouped by list (counting sort; queries ascending within a list)
    std::vector<int64_t> first(nlist + 1, 0);
    for (int64_t i = 0; i < B * P; ++i)
      if (probes[i] >= 0) ++first[probes[i] + 1];
    for (int64_t l = 0; l < nlist; ++l) first[l + 1] += first[l];
    std::vector<int64_t> pair_query(first[nlist]);
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < B * P; ++i)
      if (probes[i] >= 0) pair_query[fill[probes[i]]++] = i / P;

    // passing rows per pair, exact num_passing (a list probed twice counts twice, as in torch)
    const uint64_t* bits = reinterpret_cast<const uint64_t*>(filter_bits);
    std::vector<int64_t> pair_passing(pair_query.size());
    std::fill(out_num_passing, out_num_passing + B, 0);
    for (int64_t l = 0; l < nlist; ++l)
      for (int64_t i = first[l]; i < first[l + 1]; ++i) {
        int64_t q = pair_query[i];
        pair_passing[i] = count_passing(bits + q * W, list_offsets[l], list_offsets[l + 1]);
        out_num_passing[q] += pair_passing[i];
      }

    // top-k buffers: a query with <= 2k passing rows never compacts
    std::vector<TopK> topk(B);
    std::vector<int64_t> buf_start(B + 1, 0);
    for (int64_t b = 0; b < B; ++b)
      buf_start[b + 1] = buf_start[b] + std::min<int64_t>(out_num_passing[b], 2 * k) + 1;
    std::vector<Candidate> candidates(buf_start[B]);
    for (int64_t b = 0; b < B; ++b) {
      topk[b].buf = candidates.data() + buf_start[b];
      topk[b].cap = buf_start[b + 1] - buf_start[b];
      topk[b].k = k;
    }

    Batch bt{qwide.data(), qbytes.data(), qbias.data(), d_pad, query_scales, bits, W, codes, scales, N, D,
             int(block_min_bits), topk.data()};
    std::vector<int64_t> queries;
    for (int64_t l = 0; l < nlist; ++l) {  // list-major: a list stays in cache for its queries
      queries.clear();
      for (int64_t i = first[l]; i < first[l + 1]; ++i)
        if (pair_passing[i] > 0) queries.push_back(pair_query[i]);
      size_t j = 0;
      if (pair_queries)
        for (; j + 2 <= queries.size(); j += 2)
          scan_list_pair(bt, queries[j], queries[j + 1], list_offsets[l], list_offsets[l + 1]);
      for (; j < queries.size(); ++j)
        scan_list(bt, queries[j], list_offsets[l], list_offsets[l + 1]);
    }

    for (int64_t b = 0; b < B; ++b) topk[b].write(out_scores + b * k, out_rows + b * k);
  } catch (const std::bad_alloc&) {
    return 3;
  }
  return 0;
}

// Which builds this CPU runs (asked of the portable build before loading another): bit 0 AVX2,
// bit 1 AVX-VNNI (with AVX2).
extern "C" int64_t IAM_JOIN(iam_cpu_features_, IAM_ISA)() {
#if defined(__x86_64__) || defined(__i386__)
  int64_t avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
  return avx2 | (avx2 && __builtin_cpu_supports("avxvnni") ? 2 : 0);
#else
  return 0;
#endif
}
