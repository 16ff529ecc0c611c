// NF4 weight-only linear for CPUs: the 16-entry code book is looked up in registers
// (two 8-lane permutes and a blend, AVX2) and fused into the dot product, so the 4-bit
// weight is never expanded in memory for decode-sized inputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "nf4_scales.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;        // rows one pass of the fused kernel handles

using BlockScales = turnout::NF4Scales;

#ifdef __AVX2__
// Eight weights of one row as floats: codes -> code-book values with two 8-lane permutes and a blend.
inline __m256 lookup8(const uint8_t* codes, __m256 lut_lo, __m256 lut_hi) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  uint32_t eight;  // eight codes, element j in nibble j
  std::memcpy(&eight, codes, 4);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(eight), shifts), _mm256_set1_epi32(15));
  const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // sign bit = code >= 8
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx), high);
}

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

// One output row for M input rows: out[m] = sum_b scale(n, b) * sum_j x[m, b*B + j] * lut[code].
// Two accumulators per input row hide the FMA latency; M is a template so they stay in registers.
template <int M>
void gemv_row(const float* x, int64_t kp, const uint8_t* codes, const float* lut, const BlockScales& scales,
              int64_t n, int64_t block, float* out, int64_t out_stride) {
  const __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kp / block; ++b) {
    __m256 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    int64_t k = b * block;
    for (; k + 16 <= (b + 1) * block; k += 16) {
      const __m256 w0 = lookup8(codes + k / 2, lut_lo, lut_hi), w1 = lookup8(codes + k / 2 + 4, lut_lo, lut_hi);
      for (int m = 0; m < M; ++m) {
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * kp + k), even[m]);
        odd[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * kp + k + 8), odd[m]);
      }
    }
    if (k < (b + 1) * block) {  // a block of 8 mod 16
      const __m256 w0 = lookup8(codes + k / 2, lut_lo, lut_hi);
      for (int m = 0; m < M; ++m) even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * kp + k), even[m]);
    }
    const __m256 s = _mm256_set1_ps(scales.at(n, b));
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), s, acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m * out_stride] = hsum(acc[m]);
}
#else
template <int M>
void gemv_row(const float* x, int64_t kp, const uint8_t* codes, const float* lut, const BlockScales& scales,
              int64_t n, int64_t block, float* out, int64_t out_stride) {
  for (int m = 0; m < M; ++m) {
    float acc = 0.f;
    for (int64_t b = 0; b < kp / block; ++b) {
      float part = 0.f;
      for (int64_t k = b * block; k < (b + 1) * block; ++k) {
        const uint8_t byte = codes[k / 2];
        part += x[m * kp + k] * lut[(k & 1) ? (byte >> 4) : (byte & 15)];
      }
      acc += part * scales.at(n, b);
    }
    out[m * out_stride] = acc;
  }
}
#endif

template <int M>
void gemv(const float* x, int64_t kp, const uint8_t* codes, const float* lut, const BlockScales& scales,
          int64_t n_rows, int64_t block, float* out) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) gemv_row<M>(x, kp, codes + n * (kp / 2), lut, scales, n, block, out + n, n_rows);
  });
}

torch::Tensor dequantize_rows(const torch::Tensor& codes, const BlockScales& scales, const float* lut,
                              int64_t block) {
  const int64_t n_rows = codes.size(0), kp = codes.size(1) * 2;
  auto w = torch::empty({n_rows, kp}, torch::kFloat);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* out = w.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
#ifdef __AVX2__
    const __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
#endif
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = c + n * (kp / 2);
      for (int64_t b = 0; b < kp / block; ++b) {
        const float s = scales.at(n, b);
#ifdef __AVX2__
        const __m256 sv = _mm256_set1_ps(s);
        for (int64_t k = b * block; k < (b + 1) * block; k += 8) {
          _mm256_storeu_ps(out + n * kp + k, _mm256_mul_ps(lookup8(row + k / 2, lut_lo, lut_hi), sv));
        }
#else
        for (int64_t k = b * block; k < (b + 1) * block; ++k) {
          const uint8_t byte = row[k / 2];
          out[n * kp + k] = lut[(k & 1) ? (byte >> 4) : (byte & 15)] * s;
        }
#endif
      }
    }
  });
  return w;
}

}  // namespace

// x: float32 [M, Kp] (already padded); codes: uint8 [N, Kp/2]; absmax: float32 or int8 [N, Kp/block].
torch::Tensor nf4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax,
                         c10::optional<torch::Tensor> chunk_scale, double offset, torch::Tensor lut,
                         int64_t block, int64_t max_rows) {
  // inputs of more than max_rows rows (kernels/dispatch.py) are dequantized once into one GEMM
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "nf4: x must be contiguous float32 [M, K]");
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_contiguous(), "nf4: codes must be contiguous uint8");
  TORCH_CHECK(x.size(1) == codes.size(1) * 2, "nf4: x has ", x.size(1), " columns, weight has ", codes.size(1) * 2);
  TORCH_CHECK(block % 8 == 0 && x.size(1) % block == 0, "nf4: block size must divide K and be a multiple of 8");
  const BlockScales scales = turnout::make_nf4_scales(absmax, chunk_scale, offset);
  const float* table = lut.data_ptr<float>();
  const int64_t m_rows = x.size(0), n_rows = codes.size(0), kp = x.size(1);
  if (m_rows == 0) return torch::empty({0, n_rows}, torch::kFloat);
  if (m_rows > max_rows) {
    return torch::matmul(x, dequantize_rows(codes, scales, table, block).t());
  }
  auto out = torch::empty({m_rows, n_rows}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  using Gemv = void (*)(const float*, int64_t, const uint8_t*, const float*, const BlockScales&, int64_t, int64_t, float*);
  static constexpr Gemv kernels[kMaxRows] = {gemv<1>, gemv<2>, gemv<3>, gemv<4>, gemv<5>, gemv<6>, gemv<7>, gemv<8>};
  for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows) {  // a pass per eight rows re-reads the 4-bit weight
    const int64_t rows = std::min(kMaxRows, m_rows - m0);
    kernels[rows - 1](xp + m0 * kp, kp, c, table, scales, n_rows, block, op + m0 * n_rows);
  }
  return out;
}

torch::Tensor nf4_dequantize(torch::Tensor codes, torch::Tensor absmax, c10::optional<torch::Tensor> chunk_scale,
                             double offset, torch::Tensor lut, int64_t block) {
  return dequantize_rows(codes, turnout::make_nf4_scales(absmax, chunk_scale, offset), lut.data_ptr<float>(), block);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_linear", &nf4_linear, "NF4 weight-only linear (fused code-book lookup)");
  m.def("nf4_dequantize", &nf4_dequantize, "NF4 -> float32 weight");
}
