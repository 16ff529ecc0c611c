// Small fused CPU kernels for the decode step, where a 576-wide model spends more time in
// framework overhead than in arithmetic: RMSNorm, RoPE + KV-cache store, and attention of one
// new token per sequence over its paged cache. Float32 arithmetic over float32 or bf16 caches; tiny
// inputs stay on one thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include "common.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using turnout::dot;

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), name, " must be contiguous float32");
}

}  // namespace

// x [..., D] -> x * rsqrt(mean(x^2) + eps) * weight
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_float(x, "rms_norm: x");
  check_float(weight, "rms_norm: weight");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * d;
      const float inv = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) op[r * d + i] = xr[i] * inv * wp[i];
    }
  });
  return out;
}

namespace {

// Checks a layer's paged cache [pages, KV, P, Dh] (float32 or bf16, each page contiguous) and the
// page table [slots, pages per sequence] (int32) against the tokens' slots and positions.
int check_pages(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& table,
                const int64_t* slot, const int64_t* pos, int64_t t_count) {
  for (const auto& c : {k_cache, v_cache})
    TORCH_CHECK(c.dim() == 4 && c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3) && c.sizes() == k_cache.sizes() && c.stride(0) == k_cache.stride(0) && c.scalar_type() == k_cache.scalar_type(),
                "the caches must be pages [pages, KV, P, Dh] alike, each page contiguous");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kBFloat16, "the caches must be float32 or bf16");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kInt && table.is_contiguous(), "the page table must be contiguous int32");
  const int64_t page = k_cache.size(2), per_seq = table.size(1), n_pages = k_cache.size(0);
  TORCH_CHECK(page > 0 && (page & (page - 1)) == 0, "the page size must be a power of two");
  int shift = 0;
  while ((int64_t{1} << shift) < page) ++shift;
  const int32_t* tp = table.data_ptr<int32_t>();
  for (int64_t t = 0; t < t_count; ++t) {
    TORCH_CHECK(pos[t] >= 0 && (pos[t] >> shift) < per_seq, "position ", pos[t], " is outside the cache");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < table.size(0), "slot ", slot[t], " does not exist");
    for (int64_t i = 0; i <= pos[t] >> shift; ++i)
      TORCH_CHECK(tp[slot[t] * per_seq + i] >= 0 && tp[slot[t] * per_seq + i] < n_pages, "slot ", slot[t], " names a page outside the cache");
  }
  return shift;
}

template <typename C>
turnout::PagedRows<C> paged_rows(const torch::Tensor& cache, const torch::Tensor& table, int64_t slot, int64_t kv_head, int shift) {
  using Raw = std::remove_const_t<C>;
  Raw* base = reinterpret_cast<Raw*>(cache.data_ptr()) + kv_head * cache.stride(1);
  return {base, table.data_ptr<int32_t>() + slot * table.size(1), cache.stride(0), shift, cache.size(3)};
}

template <typename C>
void rope_store_as(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, const int64_t* pos,
                   const int64_t* slot, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& table, int shift, int64_t n_heads, int64_t n_kv_heads, torch::Tensor& q) {
  const int64_t t_count = qkv.size(0), dh = k_cache.size(3), half = dh / 2;
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float rotated[512];
  for (int64_t t = 0; t < t_count; ++t) {
    const float *c = cp + pos[t] * dh, *s = sp + pos[t] * dh, *row = src + t * qkv.size(1);
    for (int64_t h = 0; h < n_heads + n_kv_heads; ++h) {
      const float* x = row + h * dh;
      float* dst = h < n_heads ? qp + (t * n_heads + h) * dh : rotated;
      for (int64_t i = 0; i < half; ++i) {
        dst[i] = x[i] * c[i] - x[i + half] * s[i];
        dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
      if (h >= n_heads) {
        C* key = paged_rows<C>(k_cache, table, slot[t], h - n_heads, shift).row(pos[t]);
        for (int64_t i = 0; i < dh; ++i) key[i] = turnout::store_as<C>(rotated[i]);
      }
    }
    for (int64_t h = 0; h < n_kv_heads; ++h) {
      const float* x = row + (n_heads + n_kv_heads + h) * dh;
      C* value = paged_rows<C>(v_cache, table, slot[t], h, shift).row(pos[t]);
      for (int64_t i = 0; i < dh; ++i) value[i] = turnout::store_as<C>(x[i]);
    }
  }
}

}  // namespace

// qkv [T, (H + 2 KV) * Dh] for tokens at positions[T] of slots[T]: rotates queries and keys
// (rotate-half layout; cos/sin [max_pos, Dh]), stores keys and values into the paged caches
// [pages, KV, P, Dh] through the page table, and returns the rotated queries [T, H, Dh].
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                         torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor table,
                         int64_t n_heads, int64_t n_kv_heads) {
  check_float(qkv, "rope_store: qkv");
  const int64_t t_count = qkv.size(0), dh = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (n_heads + 2 * n_kv_heads) * dh && dh <= 512, "rope_store: qkv width does not match the heads");
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  const int shift = check_pages(k_cache, v_cache, table, slot, pos, t_count);
  for (int64_t t = 0; t < t_count; ++t) TORCH_CHECK(pos[t] < cos.size(0), "rope_store: position ", pos[t], " has no rotation");
  auto q = torch::empty({t_count, n_heads, dh}, qkv.options());
  if (k_cache.scalar_type() == torch::kBFloat16) {
    rope_store_as<uint16_t>(qkv, cos, sin, pos, slot, k_cache, v_cache, table, shift, n_heads, n_kv_heads, q);
  } else {
    rope_store_as<float>(qkv, cos, sin, pos, slot, k_cache, v_cache, table, shift, n_heads, n_kv_heads, q);
  }
  return q;
}

// One query per new token: q [T, H, Dh] attends over cache positions 0..positions[t] of slots[t]
// (grouped-query: head h reads kv head h / (H / KV)); a token and its drafts are several entries
// of the same slot, each computed exactly as if it came alone. Returns [T, H * Dh].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor table,
                               torch::Tensor slots, torch::Tensor positions, double scale) {
  check_float(q, "decode_attention: q");
  const int64_t b_count = q.size(0), n_heads = q.size(1), dh = q.size(2);
  const int64_t n_kv = k_cache.size(1), group = n_heads / n_kv;
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  const int shift = check_pages(k_cache, v_cache, table, slot, pos, b_count);
  const bool bf16 = k_cache.scalar_type() == torch::kBFloat16;
  auto out = torch::zeros({b_count, n_heads * dh}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t longest = 1;
  for (int64_t b = 0; b < b_count; ++b) longest = std::max(longest, pos[b] + 1);
  // split across threads only when there is enough work to pay for waking them
  const int64_t tasks = b_count * n_heads, threads = at::get_num_threads();
  const int64_t grain = tasks * longest < 2048 ? tasks : std::max<int64_t>(1, (tasks + threads - 1) / threads);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_heads, h = task % n_heads, len = pos[b] + 1;
      const float* qh = qp + task * dh;
      const float fscale = static_cast<float>(scale);
      if (bf16) {
        turnout::attend_head<uint16_t>(qh, paged_rows<const uint16_t>(k_cache, table, slot[b], h / group, shift),
                                       paged_rows<const uint16_t>(v_cache, table, slot[b], h / group, shift), len, dh,
                                       fscale, scores.data(), op + task * dh);
      } else {
        turnout::attend_head<float>(qh, paged_rows<const float>(k_cache, table, slot[b], h / group, shift),
                                    paged_rows<const float>(v_cache, table, slot[b], h / group, shift), len, dh, fscale,
                                    scores.data(), op + task * dh);
      }
    }
  });
  return out;
}

// h [..., 2 H] (gate, then up) -> silu(gate) * up [..., H]
torch::Tensor silu_mul(torch::Tensor h) {
  check_float(h, "silu_mul: h");
  const int64_t width = h.size(-1), hidden = width / 2, rows = h.numel() / width;
  auto sizes = h.sizes().vec();
  sizes.back() = hidden;
  auto out = torch::empty(sizes, h.options());
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) turnout::silu_mul_row(hp + r * width, hp + r * width + hidden, op + r * hidden, hidden);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (float32)");
  m.def("rope_store", &rope_store, "RoPE for queries and keys, keys and values into the cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection (float32)");
  m.def("decode_attention", &decode_attention, "attention of one new token per sequence over its cache");
}
