// 4-bit weight linears for decode-sized inputs with the activations quantized to int8 on the fly
// (per block of 32, absmax scale), so the inner product runs on integer multiply-adds: 32
// weights per maddubs instead of 8 per float FMA. The weights stay in turnout's reference layout
// (codes [N, Kp/2], the even column in the low nibble). Per block of 32 the activations are
// stored reordered (the 16 even columns, then the 16 odd ones) so the low nibbles of 16 code
// bytes line up with the first half and the high nibbles with the second, with no shuffles.
//   int4: w = (q - 8) s + z  ->  sum_k w x = s * sum_b d_b ((q - 8) . xq_b) + z * sum_k x
//   (centred codes, so the activation rounding error meets |q - 8| <= 8, not q <= 15; the zero
//   term uses the exact sum of x)
//   nf4:  w = NF4[q] a       ->  a / 127 * sum_b d_b (lut8[q] . xq_b), lut8 = round(127 NF4)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "common.h"
#include "nf4_scales.h"
#include <cmath>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int kRowsPerPass = 4;

struct Activations {
  std::vector<int8_t> q;    // [M, Kp], reordered within each block of 32
  std::vector<float> d;     // [M, Kp / 32] block scales
  std::vector<float> sum;        // [M, Kp / 32] exact block sums of x
  std::vector<float> group_sum;  // [M, Kp / group] exact group sums of x (the int4 zero term)
  int64_t kp = 0, blocks = 0;
};

Activations quantize_activations(const torch::Tensor& x, int64_t kp) {
  const int64_t rows = x.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  Activations a;
  a.kp = kp;
  a.blocks = kp / kBlock;
  a.q.assign(rows * kp, 0);
  a.d.assign(rows * a.blocks, 0.f);
  a.sum.assign(rows * a.blocks, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < a.blocks; ++b) {
      const int64_t col = b * kBlock, have = std::max<int64_t>(0, std::min(kBlock, k - col));
      float v[kBlock] = {};
      std::memcpy(v, xp + m * k + col, have * sizeof(float));
      int8_t q[kBlock];
      const turnout::QuantBlock r = turnout::quantize_block(v, q);  // the native step's quantization
      int8_t* out = a.q.data() + m * kp + col;
      for (int64_t j = 0; j < kBlock; ++j) out[(j & 1) * 16 + j / 2] = q[j];
      a.d[m * a.blocks + b] = r.d;
      a.sum[m * a.blocks + b] = r.sum;
    }
  }
  return a;
}

void add_group_sums(Activations& a, int64_t rows, int64_t group) {
  const int64_t per_group = group / kBlock, groups = a.kp / group;
  a.group_sum.assign(rows * groups, 0.f);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t b = 0; b < a.blocks; ++b) a.group_sum[m * groups + b / per_group] += a.sum[m * a.blocks + b];
}

using turnout::bf16_to_float;
using turnout::NF4Scales;

#ifdef __AVX2__
// 32 codes of one block as bytes, in the reordered column order (low nibbles, then high).
inline __m256i nibbles(const uint8_t* codes) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15));
}

// Eight int32 partial sums of (unsigned w) . (signed x) over one block.
inline __m256i dot_block(__m256i w_unsigned, __m256i x_signed) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w_unsigned, x_signed), _mm256_set1_epi16(1));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// The exact integer dot product of one block's codes (signed bytes) with row m0 + m's activations.
inline int32_t block_dot(const Activations& a, int64_t row, int64_t b, __m256i w) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.kp + b * kBlock));
  return hsum_epi32(dot_block(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)));
}

inline __m256i int4_codes(const uint8_t* codes, int64_t b) {  // centred, -8..7
  return _mm256_sub_epi8(nibbles(codes + b * (kBlock / 2)), _mm256_set1_epi8(8));
}

inline __m256i nf4_codes(const uint8_t* codes, int64_t b, __m256i lut) {
  return _mm256_shuffle_epi8(lut, nibbles(codes + b * (kBlock / 2)));
}
#else
// Portable twins of the block's exact integer dot product.
inline int code_at(const uint8_t* codes, int64_t b, int64_t j) {
  const uint8_t byte = codes[b * (kBlock / 2) + j % 16];
  return j < 16 ? (byte & 15) : (byte >> 4);
}
#endif

// Both row kernels sum in the native step's order (kernels/cpu/step.cpp), so a decode on the
// torch path and on the step quantize the same activations to the same codes: per block an exact
// integer dot product, then per group (int4) or code-book block (nf4) a chain of fused
// multiply-adds: part = fma(dot_b, d_b, part); acc = fma(part, scale, acc) (+ fma(zero, sum(x), acc)).
// part[m] = fma(dot_b, d_b, part[m]) over blocks b0 .. b0 + count of input rows m0 ..: on AVX2
// codes(b) is block b's codes as signed bytes; on scalar codes(b, j) is its code in position j.
template <int M, typename Codes>
void block_chain(const Activations& a, int64_t m0, int64_t b0, int64_t count, Codes&& codes, float (&part)[M]) {
  for (int64_t b = b0; b < b0 + count; ++b) {
#ifdef __AVX2__
    const __m256i w = codes(b);
#endif
    for (int m = 0; m < M; ++m) {
      const int64_t row = m0 + m;
#ifdef __AVX2__
      const int32_t dot = block_dot(a, row, b, w);
#else
      int32_t dot = 0;
      for (int64_t j = 0; j < kBlock; ++j) dot += codes(b, j) * a.q[row * a.kp + b * kBlock + j];
#endif
      part[m] = std::fma(static_cast<float>(dot), a.d[row * a.blocks + b], part[m]);
    }
  }
}

template <int M>
void int4_row(const Activations& a, const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
              int64_t group, int64_t m0, float* out, int64_t out_stride) {
  const int64_t per_group = group / kBlock, groups = a.kp / group;
#ifdef __AVX2__
  auto centred = [&](int64_t b) { return int4_codes(codes, b); };
#else
  auto centred = [&](int64_t b, int64_t j) { return code_at(codes, b, j) - 8; };
#endif
  float acc[M] = {};
  for (int64_t g = 0; g < groups; ++g) {
    float part[M] = {};
    block_chain<M>(a, m0, g * per_group, per_group, centred, part);
    for (int m = 0; m < M; ++m) {
      acc[m] = std::fma(part[m], bf16_to_float(scales[g]), acc[m]);
      acc[m] = std::fma(bf16_to_float(zeros[g]), a.group_sum[(m0 + m) * groups + g], acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m * out_stride] = acc[m];
}

template <int M, typename Lut>
void nf4_row(const Activations& a, const uint8_t* codes, const NF4Scales& scales, int64_t n, int64_t block,
             Lut lut, int64_t m0, float* out, int64_t out_stride) {
  const int64_t per_block = block / kBlock, n_blocks = a.kp / block;
#ifdef __AVX2__
  auto looked_up = [&](int64_t b) { return nf4_codes(codes, b, lut); };
#else
  auto looked_up = [&](int64_t b, int64_t j) { return static_cast<int>(lut[code_at(codes, b, j)]); };
#endif
  float acc[M] = {};
  for (int64_t s = 0; s < n_blocks; ++s) {
    float part[M] = {};
    block_chain<M>(a, m0, s * per_block, per_block, looked_up, part);
    const float scale = scales.at(n, s) / 127.f;
    for (int m = 0; m < M; ++m) acc[m] = std::fma(part[m], scale, acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m * out_stride] = acc[m];
}

// Runs row_fn<M>(m0, n) over all input rows (passes of up to 4) and output rows (in parallel).
template <typename F>
void for_rows(int64_t rows, int64_t n_rows, F&& row_fn) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
      const int64_t left = std::min<int64_t>(kRowsPerPass, rows - m0);
      for (int64_t n = begin; n < end; ++n) {
        switch (left) {
          case 1: row_fn(std::integral_constant<int, 1>{}, m0, n); break;
          case 2: row_fn(std::integral_constant<int, 2>{}, m0, n); break;
          case 3: row_fn(std::integral_constant<int, 3>{}, m0, n); break;
          default: row_fn(std::integral_constant<int, 4>{}, m0, n); break;
        }
      }
    }
  });
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& codes, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "a8: x must be contiguous float32 [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kByte && codes.is_contiguous(), "a8: codes must be uint8 [N, Kp/2]");
  TORCH_CHECK(group % kBlock == 0, "a8: the group / block size must be a multiple of 32");
  TORCH_CHECK(x.size(1) <= codes.size(1) * 2, "a8: x is wider than the weight");
}

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                      const torch::Tensor& zeros, int64_t group) {
  check_inputs(x, codes, group);
  TORCH_CHECK(scales.scalar_type() == torch::kBFloat16 && zeros.scalar_type() == torch::kBFloat16, "a8: int4 scales and zeros must be bf16");
  const int64_t n_rows = codes.size(0), kp = codes.size(1) * 2, rows = x.size(0), groups = kp / group;
  Activations a = quantize_activations(x, kp);
  add_group_sums(a, rows, group);
  auto out = torch::empty({rows, n_rows}, torch::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const auto* z = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  for_rows(rows, n_rows, [&](auto M, int64_t m0, int64_t n) {
    int4_row<decltype(M)::value>(a, c + n * (kp / 2), s + n * groups, z + n * groups, group, m0, o + m0 * n_rows + n, n_rows);
  });
  return out;
}

torch::Tensor nf4_mm(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& absmax,
                     const c10::optional<torch::Tensor>& chunk_scale, double offset, int64_t block,
                     const torch::Tensor& lut8) {
  check_inputs(x, codes, block);
  TORCH_CHECK(lut8.numel() == 16 && lut8.scalar_type() == torch::kChar, "a8: the nf4 code book must be 16 int8 values");
  const NF4Scales scales = turnout::make_nf4_scales(absmax, chunk_scale, offset);
  const int64_t n_rows = codes.size(0), kp = codes.size(1) * 2, rows = x.size(0);
  const Activations a = quantize_activations(x, kp);
  auto out = torch::empty({rows, n_rows}, torch::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
#ifdef __AVX2__
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut8.data_ptr<int8_t>())));
#else
  const int8_t* lut = lut8.data_ptr<int8_t>();
#endif
  for_rows(rows, n_rows, [&](auto M, int64_t m0, int64_t n) {
    nf4_row<decltype(M)::value>(a, c + n * (kp / 2), scales, n, block, lut, m0, o + m0 * n_rows + n, n_rows);
  });
  return out;
}

// float32 W [N, Kp] from the int4 reference layout (for wide inputs, which take one GEMM).
torch::Tensor int4_dequantize(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t group) {
  const int64_t n_rows = codes.size(0), kp = codes.size(1) * 2, groups = kp / group;
  auto w = torch::empty({n_rows, kp}, torch::kFloat);
  float* wp = w.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const auto* z = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = bf16_to_float(s[n * groups + g]), base = bf16_to_float(z[n * groups + g]) - 8.f * sc;
        const uint8_t* src = c + n * (kp / 2) + g * (group / 2);
        float* dst = wp + n * kp + g * group;
#ifdef __AVX2__
        const __m256 sv = _mm256_set1_ps(sc), bv = _mm256_set1_ps(base);
        const __m128i mask = _mm_set1_epi8(15);
        for (int64_t j = 0; j < group / 2; j += 16, dst += 32) {  // 16 bytes -> 32 weights in column order
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
          const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
          const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
          const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
          for (int p = 0; p < 4; ++p) {
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
            _mm256_storeu_ps(dst + 8 * p, _mm256_fmadd_ps(v, sv, bv));
          }
        }
#else
        for (int64_t k = 0; k < group; k += 2) {
          const uint8_t byte = src[k / 2];
          dst[k] = (byte & 15) * sc + base;
          dst[k + 1] = (byte >> 4) * sc + base;
        }
#endif
      }
    }
  });
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "x [M, K] @ W.T for int4 W, int8 activations (float32 out)");
  m.def("nf4_mm", &nf4_mm, "x [M, K] @ W.T for nf4 W, int8 activations (float32 out)");
  m.def("int4_dequantize", &int4_dequantize, "float32 W [N, Kp] from the int4 reference layout");
}
