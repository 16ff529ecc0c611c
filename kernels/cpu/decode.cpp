// Small fused CPU kernels for the decode step, where a 576-wide model spends more time in
// framework overhead than in arithmetic: RMSNorm, RoPE + KV-cache store, and attention of one
// new token per sequence over its cache. Float32 throughout; tiny inputs stay on one thread.
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

// qkv [T, (H + 2 KV) * Dh] for tokens at positions[T] of slots[T]: rotates queries and keys
// (rotate-half layout; cos/sin [max_pos, Dh]), stores keys and values into the caches
// [slots, KV, L, Dh], and returns the rotated queries [T, H, Dh].
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                         torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t n_heads,
                         int64_t n_kv_heads) {
  check_float(qkv, "rope_store: qkv");
  check_float(k_cache, "rope_store: k_cache");
  check_float(v_cache, "rope_store: v_cache");
  const int64_t t_count = qkv.size(0), dh = k_cache.size(3), max_len = k_cache.size(2), half = dh / 2;
  TORCH_CHECK(qkv.size(1) == (n_heads + 2 * n_kv_heads) * dh, "rope_store: qkv width does not match the heads");
  auto q = torch::empty({t_count, n_heads, dh}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < t_count; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_len, "rope_store: position ", pos[t], " is outside the cache");
    const float *c = cp + pos[t] * dh, *s = sp + pos[t] * dh, *row = src + t * qkv.size(1);
    for (int64_t h = 0; h < n_heads + n_kv_heads; ++h) {
      const float* x = row + h * dh;
      float* dst = h < n_heads ? qp + (t * n_heads + h) * dh
                               : kc + ((slot[t] * n_kv_heads + (h - n_heads)) * max_len + pos[t]) * dh;
      for (int64_t i = 0; i < half; ++i) {
        dst[i] = x[i] * c[i] - x[i + half] * s[i];
        dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
    }
    for (int64_t h = 0; h < n_kv_heads; ++h) {
      const float* x = row + (n_heads + n_kv_heads + h) * dh;
      std::memcpy(vc + ((slot[t] * n_kv_heads + h) * max_len + pos[t]) * dh, x, dh * sizeof(float));
    }
  }
  return q;
}

// One query per new token: q [T, H, Dh] attends over cache positions 0..positions[t] of slots[t]
// (grouped-query: head h reads kv head h / (H / KV)); a token and its drafts are several entries
// of the same slot, each computed exactly as if it came alone. Returns [T, H * Dh].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor positions, double scale) {
  check_float(q, "decode_attention: q");
  const int64_t b_count = q.size(0), n_heads = q.size(1), dh = q.size(2);
  const int64_t n_kv = k_cache.size(1), max_len = k_cache.size(2), group = n_heads / n_kv;
  auto out = torch::zeros({b_count, n_heads * dh}, q.options());
  const float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
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
      const float* keys = kc + (slot[b] * n_kv + h / group) * max_len * dh;
      const float* values = vc + (slot[b] * n_kv + h / group) * max_len * dh;
      turnout::attend_head(qh, keys, values, len, dh, static_cast<float>(scale), scores.data(), op + task * dh);
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
