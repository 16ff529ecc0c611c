// The arithmetic the native step (step.cpp) shares with the torch path's decode kernels (decode.cpp,
// a8.cpp): activation quantization, one query head's attention, SiLU. Both paths call these same
// functions, so a decode step computes bit for bit the same on either; a different summation order
// in one of them would let an int8 activation code on a rounding boundary move by one.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace turnout {

constexpr int64_t kQuantBlock = 32;

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_float(v); }

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

// the eight horizontal sums of v[0..7], in that order
inline __m256 hsum8(const __m256 (&v)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Cephes' expf: e^x = 2^n * e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts), and e^r
// a degree-5 polynomial (kExpPoly, highest power first), ~1 ulp. exp8 here and step.cpp's exp16
// evaluate it with the same operations in the same order.
constexpr float kExpLow = -87.3f, kExpHigh = 88.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// e^x for x <= 0 and moderate x > 0
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLow)), _mm256_set1_ps(kExpHigh));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  total = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Quantizes 32 values (zero-padded by the caller) to int8 codes: absmax / 127, round half to even.
struct QuantBlock {
  float d, sum;  // the scale, and the exact float sum of the 32 inputs
  int32_t qsum;  // the sum of the codes
};

inline QuantBlock quantize_block(const float* v, int8_t* out) {
  QuantBlock r{};
#if defined(__AVX2__)
  __m256 x[4];
  for (int i = 0; i < 4; ++i) x[i] = _mm256_loadu_ps(v + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x[0]), _mm256_andnot_ps(sign, x[1])),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, x[2]), _mm256_andnot_ps(sign, x[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  r.sum = hsum(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), q8);
  const __m256i s16 = _mm256_madd_epi16(_mm256_add_epi16(q16, q16b), _mm256_set1_epi16(1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  r.qsum = _mm_cvtsi128_si32(s);
  r.d = amax / 127.f;
#else
  float amax = 0.f, sum = 0.f;
  for (int j = 0; j < kQuantBlock; ++j) {
    amax = std::max(amax, std::fabs(v[j]));
    sum += v[j];
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int j = 0; j < kQuantBlock; ++j) {
    out[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
    r.qsum += out[j];
  }
  r.d = amax / 127.f;
  r.sum = sum;
#endif
  return r;
}

// out[i] = silu(gate[i]) * up[i]
inline void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// scores[0..n) -> their softmax, in place
inline void softmax(float* scores, int64_t n, float top = -INFINITY) {
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX2__)
  __m256 top8 = _mm256_set1_ps(top), total8 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(scores + j));
  __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
  t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
  top = _mm_cvtss_f32(_mm_max_ss(t4, _mm_movehdup_ps(t4)));
#endif
  for (; j < n; ++j) top = std::max(top, scores[j]);
  j = 0;
#if defined(__AVX2__)
  for (const __m256 top_v = _mm256_set1_ps(top); j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top_v));
    _mm256_storeu_ps(scores + j, e);
    total8 = _mm256_add_ps(total8, e);
  }
  total = hsum(total8);
#endif
  for (; j < n; ++j) total += (scores[j] = std::exp(scores[j] - top));
  const float inv = 1.f / total;
  for (j = 0; j < n; ++j) scores[j] *= inv;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename C>
C store_as(float v) {
  if constexpr (std::is_same_v<C, float>) {
    return v;
  } else {
    return float_to_bf16(v);
  }
}

// One sequence's keys (or values) for one kv head in a paged cache [pages, KV, P, dh]: row j is
// entry j % P of page pages[j / P]. P is a power of two; a page's P rows are contiguous.
template <typename C>
struct PagedRows {
  C* base;                 // the cache at page 0, this kv head
  const int32_t* pages;    // the sequence's pages, in order
  int64_t page_stride;     // elements from one page to the next
  int shift;               // log2 P
  int64_t dh;
  int64_t page_size() const { return int64_t{1} << shift; }
  C* page(int64_t i) const { return base + pages[i] * page_stride; }  // rows i*P ..
  C* row(int64_t j) const { return page(j >> shift) + (j & (page_size() - 1)) * dh; }
};

// One query head q [dh] over `len` cached keys and values (paged rows of dh, float32 or bf16) ->
// out [dh]. `scores` holds len floats. Page by page, in the order a contiguous cache would take:
// with pages of a multiple of 8 rows, every key takes the same arithmetic it would there.
template <typename C>
void attend_head(const float* q, const PagedRows<const C>& keys, const PagedRows<const C>& values, int64_t len,
                 int64_t dh, float scale, float* scores, float* out) {
  const int64_t page = keys.page_size();
  for (int64_t p0 = 0; p0 < len; p0 += page) {
    const C* kp = keys.page(p0 / page);
    const int64_t n = std::min(page, len - p0);
    float* sp = scores + p0;
    int64_t j = 0;
#if defined(__AVX2__)
    if (dh % 8 == 0) {
      for (; j + 8 <= n; j += 8) {  // eight keys at a time: their dot products side by side
        __m256 acc[8];
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
        for (int64_t i = 0; i < dh; i += 8) {
          const __m256 qv = _mm256_loadu_ps(q + i);
          for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, load8(kp + (j + k) * dh + i), acc[k]);
        }
        _mm256_storeu_ps(sp + j, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
      }
    }
#endif
    for (; j < n; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < dh; ++i) s += q[i] * widen(kp[j * dh + i]);
      sp[j] = s * scale;
    }
  }
  softmax(scores, len);
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 32 <= dh; i += 32) {  // 32 output values in registers over every value row
    __m256 o[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t p0 = 0; p0 < len; p0 += page) {
      const C* vp = values.page(p0 / page) + i;
      for (int64_t j = 0, n = std::min(page, len - p0); j < n; ++j) {
        const __m256 p = _mm256_set1_ps(scores[p0 + j]);
        for (int k = 0; k < 4; ++k) o[k] = _mm256_fmadd_ps(p, load8(vp + j * dh + 8 * k), o[k]);
      }
    }
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + i + 8 * k, o[k]);
  }
#endif
  for (; i < dh; ++i) {
    float o = 0.f;
    for (int64_t j = 0; j < len; ++j) o = std::fma(scores[j], widen(*(values.row(j) + i)), o);
    out[i] = o;
  }
}

}  // namespace turnout
