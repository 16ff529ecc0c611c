// The native decode step: one call runs a Llama-family model over every token of an engine step
// (a token per sequence, or a token and its drafts) and returns the logits. Between the layers
// nothing returns to Python; a persistent pool of threads, one per core, splits each matrix by
// output rows and meets at a spin barrier between dependent stages (five per layer).
//
// Weights are repacked once (pack_int4 / pack_nf4) into tiles of 16 output rows. Per group of
// columns a tile holds its 16 rows' scales (64 bytes), then per block of 32 columns 256 bytes of
// codes: chunk c (64 bytes) has 4 bytes per row, byte j carrying column 8c + j in its low nibble
// and 8c + 4 + j in its high nibble. One 4-byte broadcast of the int8 activations then meets the
// same 4 columns of all 16 rows, and a multiply-add of unsigned codes by signed activations
// leaves each row's partial sum in its own 32-bit lane: no horizontal sums, one activation load
// for 16 rows. The multiply-add is vpdpbusd on a zmm (a whole tile) with AVX-512 VNNI, and
// vpmaddubsw + vpmaddwd on two ymm halves with AVX2.
//   int4: w = (q - 8) s + z  ->  s * sum_b d_b (q . xq_b - 8 sum(xq_b)) + z * sum_group(x)
//   nf4:  w = NF4[q] a       ->  a / 127 * sum_b d_b (lut8[q] . xq_b)
//         (VNNI: lut8 + 128 as unsigned codes, minus 128 sum(xq_b); AVX2: |w| . sign(x, w))
// The activations are quantized to int8 per block of 32 (absmax / 127, round half to even) once
// per matrix input, and shared by the matrices that read the same input (Q/K/V; gate/up): the
// same arithmetic as kernels/cpu/a8.cpp, whose torch twin is the reference.
// Unquantized models read their 16-bit (or float32) weights row by row, widened in registers.
#include <torch/extension.h>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <mutex>
#include <thread>
#include <vector>
#include "common.h"
#include "nf4_scales.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 16;    // output rows interleaved per tile
constexpr int64_t kBlock = 32;   // activation block
constexpr int64_t kChunk = 256;  // code bytes per block per tile: 4 chunks of 4 bytes per row
constexpr int64_t kHeader = 64;  // scale bytes per group per tile
constexpr int kPass = 4;        // input rows that share one read of a tile
constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kShareRows = 8;  // input rows from which the threads split quantizing them (and SiLU)
enum Role { kRoleQKV, kRoleWo, kRoleW13, kRoleW2, kRoleHead, kRoleInput, kRoles };

enum Kind : int64_t { kInt4 = 0, kNF4 = 1, kBF16 = 2, kF32 = 3 };

using turnout::bf16_to_float;
using turnout::dot;
using turnout::float_to_bf16;
using turnout::PagedRows;

inline void pause() {
#if defined(__AVX2__) || defined(__SSE2__)
  _mm_pause();
#endif
}

// ---------------------------------------------------------------------------------------------
// A pool of threads that stays up between steps: run() hands every thread (the caller is thread
// 0) the same function; sync() is a spin barrier among them. Idle workers spin a little, then
// sleep on a condition variable so an idle server does not burn its cores.
class Pool {
 public:
  explicit Pool(int threads) : n_(std::max(1, threads)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return n_; }

  // One job at a time: steps sharing the pool (the experts of a server, a target and its draft
  // head) take turns rather than running two sets of threads on the same cores.
  void run(const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> turn(turn_);
    job_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0);
    while (done_.load(std::memory_order_acquire) != n_ - 1) pause();
  }

  void sync() {
    if (n_ == 1) return;
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      while (generation_.load(std::memory_order_acquire) == gen) pause();
    }
  }

 private:
  void loop(int id) {
    int64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
      int64_t now = epoch_.load(std::memory_order_acquire);
      for (int i = 0; now == seen; ++i) {
        pause();
        now = epoch_.load(std::memory_order_acquire);
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > spin_until) break;
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        now = epoch_.load(std::memory_order_acquire);
      }
      seen = now;
      if (stop_) return;
      (*job_)(id);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex mutex_, turn_;
  std::condition_variable wake_;
  std::atomic<int64_t> epoch_{0};
  std::atomic<int> done_{0}, arrived_{0}, generation_{0};
  const std::function<void(int)>* job_ = nullptr;
  bool stop_ = false;
};

// The process's pool of `threads` threads, shared by every step built with that many: idle workers
// spin for a while after each job, so two pools would spin against each other's work on few cores.
std::shared_ptr<Pool> shared_pool(int threads) {
  static std::mutex registry_mutex;
  static std::map<int, std::weak_ptr<Pool>> registry;
  std::lock_guard<std::mutex> lock(registry_mutex);
  std::shared_ptr<Pool> pool = registry[threads].lock();
  if (!pool) registry[threads] = pool = std::make_shared<Pool>(threads);
  return pool;
}

// The share [begin, end) of n items that thread id of n_threads takes, in whole multiples of unit.
inline std::pair<int64_t, int64_t> share(int64_t n, int id, int n_threads, int64_t unit = 1) {
  const int64_t units = (n + unit - 1) / unit;
  const int64_t begin = units * id / n_threads * unit, end = units * (id + 1) / n_threads * unit;
  return {std::min(begin, n), std::min(end, n)};
}

// ---------------------------------------------------------------------------------------------
// Activations of one matrix input, quantized per block of 32 (natural column order).
struct Quantized {
  int64_t rows = 0, kp = 0;
  std::vector<int8_t> q;       // [rows, kp]
  std::vector<float> d;        // [rows, kp / 32] block scales
  std::vector<int32_t> qsum;   // [rows, kp / 32] sum of the block's codes
  std::vector<float> xsum;     // [rows, kp / 32] exact sum of the block's inputs
  std::vector<float> gsum;     // [rows, kp / group] exact sum of each group's inputs (int4 zeros)
  std::vector<int32_t> qoff;   // [rows, kp / 32] offset * qsum: what unsigned codes add to a dot product

  void resize(int64_t r, int64_t width) {
    rows = r;
    kp = width;
    q.resize(r * width);
    d.resize(r * width / kBlock);
    qsum.resize(r * width / kBlock);
    xsum.resize(r * width / kBlock);
    qoff.resize(r * width / kBlock);
  }

  // Per-matrix extras of row m (after quantize_row): group sums for `group`, and the code offset
  // the kernel subtracts. gsum must hold rows * kp / group.
  void finish_row(int64_t m, int64_t group, int32_t offset) {
    const int64_t blocks = kp / kBlock, per_group = group / kBlock, groups = kp / group;
    std::fill_n(gsum.begin() + m * groups, groups, 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      gsum[m * groups + b / per_group] += xsum[m * blocks + b];
      qoff[m * blocks + b] = offset * qsum[m * blocks + b];
    }
  }

  void size_for(int64_t r, int64_t width, int64_t group) {
    resize(r, width);
    gsum.resize(r * width / group);
  }
};

void quantize_row(const float* x, int64_t k, Quantized& a, int64_t m) {
  const int64_t blocks = a.kp / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t col = b * kBlock, have = std::max<int64_t>(0, std::min(kBlock, k - col));
    float v[kBlock] = {};
    std::memcpy(v, x + col, have * sizeof(float));
    const turnout::QuantBlock r = turnout::quantize_block(v, a.q.data() + m * a.kp + col);
    a.d[m * blocks + b] = r.d;
    a.qsum[m * blocks + b] = r.qsum;
    a.xsum[m * blocks + b] = r.sum;
  }
}

// ---------------------------------------------------------------------------------------------
// A weight matrix as the step reads it.
struct Matrix {
  Kind kind = kF32;
  int64_t n = 0, k = 0, kp = 0, group = 32;
  int role = 0;  // which of a layer's inputs it reads (kRoles): its shared activation buffer
  torch::Tensor data;  // packed tiles (uint8) or the row-major weight (bf16 / f32) [n, k]

  int64_t groups() const { return kp / group; }
  int64_t tile_bytes() const { return groups() * (kHeader + group / kBlock * kChunk); }
};

// Where a matrix's output goes: stored, or added to what is there (the residual).
struct Out {
  float* data;
  int64_t stride;
  bool add;
  void put(int64_t m, int64_t n0, const float* v, int64_t count) const {
    float* row = data + m * stride + n0;
    if (add) {
      for (int64_t i = 0; i < count; ++i) row[i] += v[i];
    } else {
      std::memcpy(row, v, count * sizeof(float));
    }
  }
};

#if defined(__AVX2__)
inline __m256 load_bf16x8(const uint16_t* p) { return turnout::load8(p); }
using turnout::hsum;
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// ---- AVX-512 VNNI: a whole tile (16 rows) per zmm, vpdpbusd. nf4 codes look up LUT8 + 128 (unsigned),
// so both formats multiply unsigned codes and subtract offset * sum(xq) (8 for int4, 128 for nf4).
constexpr int32_t kNF4Offset = 128;

inline __m512 load_bf16x16(const uint8_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int M, bool NF4>
void quant_tile(const Matrix& w, const Quantized& a, int64_t m0, const uint8_t* tile, float (*out)[kTile],
                const int8_t* lut8) {
  const int64_t per_group = w.group / kBlock, groups = w.groups(), blocks = a.kp / kBlock;
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i lut = _mm512_add_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut8))),
                                      _mm512_set1_epi8(static_cast<char>(0x80)));
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 scale = NF4 ? _mm512_loadu_ps(reinterpret_cast<const float*>(tile)) : load_bf16x16(tile);
    const __m512 zero = NF4 ? _mm512_setzero_ps() : load_bf16x16(tile + 32);
    tile += kHeader;
    __m512 part[M];
    for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < per_group; ++p, tile += kChunk) {
      const int64_t b = g * per_group + p;
      __m512i codes[8];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i raw = _mm512_loadu_si512(tile + 64 * c);
        codes[2 * c] = _mm512_and_si512(raw, low);
        codes[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        if constexpr (NF4) {
          codes[2 * c] = _mm512_shuffle_epi8(lut, codes[2 * c]);
          codes[2 * c + 1] = _mm512_shuffle_epi8(lut, codes[2 * c + 1]);
        }
      }
      // the rows' chains side by side, two per row (even and odd chunks): the multiply-adds of one
      // chain wait on each other, those of different chains do not
      const int32_t* xw[M];
      __m512i dot[M][2];
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        xw[m] = reinterpret_cast<const int32_t*>(a.q.data() + (m0 + m) * a.kp + b * kBlock);
        dot[m][0] = dot[m][1] = _mm512_setzero_si512();
      }
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) dot[m][c & 1] = _mm512_dpbusd_epi32(dot[m][c & 1], codes[c], _mm512_set1_epi32(xw[m][c]));
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const int64_t i = (m0 + m) * blocks + b;
        const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(dot[m][0], dot[m][1]), _mm512_set1_epi32(a.qoff[i]));
        part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.d[i]), part[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm512_fmadd_ps(part[m], scale, acc[m]);
      if constexpr (!NF4) acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(a.gsum[(m0 + m) * groups + g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(out[m], acc[m]);
}
#elif defined(__AVX2__)
// ---- AVX2: a tile as two halves of 8 rows per ymm, vpmaddubsw + vpmaddwd (nf4: |w| . sign(x, w))
constexpr int32_t kNF4Offset = 0;

template <int M, bool NF4>
void quant_tile(const Matrix& w, const Quantized& a, int64_t m0, const uint8_t* tile0, float (*out)[kTile],
                const int8_t* lut8) {
  const int64_t per_group = w.group / kBlock, groups = w.groups(), blocks = a.kp / kBlock;
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut8)));
  for (int64_t half = 0; half < 2; ++half) {
    const uint8_t* tile = tile0;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = NF4 ? _mm256_loadu_ps(reinterpret_cast<const float*>(tile) + 8 * half)
                               : load_bf16x8(reinterpret_cast<const uint16_t*>(tile) + 8 * half);
      const __m256 zero = NF4 ? _mm256_setzero_ps() : load_bf16x8(reinterpret_cast<const uint16_t*>(tile + 32) + 8 * half);
      tile += kHeader;
      __m256 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t p = 0; p < per_group; ++p, tile += kChunk) {
        const int64_t b = g * per_group + p;
        __m256i codes[8];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * c + 32 * half));
          codes[2 * c] = _mm256_and_si256(raw, low);
          codes[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
          if constexpr (NF4) {
            codes[2 * c] = _mm256_shuffle_epi8(lut, codes[2 * c]);
            codes[2 * c + 1] = _mm256_shuffle_epi8(lut, codes[2 * c + 1]);
          }
        }
        const int32_t* xw[M];
        __m256i dot[M][2];
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          xw[m] = reinterpret_cast<const int32_t*>(a.q.data() + (m0 + m) * a.kp + b * kBlock);
          dot[m][0] = dot[m][1] = _mm256_setzero_si256();
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const __m256i wu = NF4 ? _mm256_sign_epi8(codes[c], codes[c]) : codes[c];
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            __m256i x = _mm256_set1_epi32(xw[m][c]);
            if constexpr (NF4) x = _mm256_sign_epi8(x, codes[c]);
            dot[m][c & 1] = _mm256_add_epi32(dot[m][c & 1], _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x), ones));
          }
        }
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const int64_t i = (m0 + m) * blocks + b;
          const __m256i sum = _mm256_sub_epi32(_mm256_add_epi32(dot[m][0], dot[m][1]), _mm256_set1_epi32(a.qoff[i]));
          part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(a.d[i]), part[m]);
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(part[m], scale, acc[m]);
        if constexpr (!NF4) acc[m] = _mm256_fmadd_ps(zero, _mm256_set1_ps(a.gsum[(m0 + m) * groups + g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(out[m] + 8 * half, acc[m]);
  }
}
#else
// ---- the portable twin: the same layout and the same integer arithmetic, one value at a time
constexpr int32_t kNF4Offset = 0;

template <int M, bool NF4>
void quant_tile(const Matrix& w, const Quantized& a, int64_t m0, const uint8_t* tile, float (*out)[kTile],
                const int8_t* lut8) {
  const int64_t per_group = w.group / kBlock, groups = w.groups(), blocks = a.kp / kBlock;
  float acc[M][kTile] = {};
  for (int64_t g = 0; g < groups; ++g) {
    float scale[kTile], zero[kTile] = {};
    for (int r = 0; r < kTile; ++r) {
      if constexpr (NF4) {
        std::memcpy(&scale[r], tile + 4 * r, 4);
      } else {
        uint16_t sv, zv;
        std::memcpy(&sv, tile + 2 * r, 2);
        std::memcpy(&zv, tile + 32 + 2 * r, 2);
        scale[r] = bf16_to_float(sv);
        zero[r] = bf16_to_float(zv);
      }
    }
    tile += kHeader;
    float part[M][kTile] = {};
    for (int64_t p = 0; p < per_group; ++p, tile += kChunk) {
      const int64_t b = g * per_group + p;
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a.q.data() + (m0 + m) * a.kp + b * kBlock;
        const int64_t i = (m0 + m) * blocks + b;
        for (int r = 0; r < kTile; ++r) {
          int32_t dot = 0;
          for (int c = 0; c < 4; ++c) {
            for (int j = 0; j < 4; ++j) {
              const uint8_t byte = tile[64 * c + 4 * r + j];
              const int lo = byte & 15, hi = byte >> 4;
              dot += (NF4 ? lut8[lo] : lo) * x[8 * c + j] + (NF4 ? lut8[hi] : hi) * x[8 * c + 4 + j];
            }
          }
          dot -= a.qoff[i];
          part[m][r] = std::fma(static_cast<float>(dot), a.d[i], part[m][r]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < kTile; ++r) {
        acc[m][r] = std::fma(part[m][r], scale[r], acc[m][r]);
        if (!NF4) acc[m][r] = std::fma(zero[r], a.gsum[(m0 + m) * groups + g], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(out[m], acc[m], sizeof(acc[m]));
}
#endif

template <int M, bool NF4>
void quant_tiles(const Matrix& w, const Quantized& a, int64_t m0, int64_t t0, int64_t t1, const Out& out,
                 const int8_t* lut8) {
  const uint8_t* base = w.data.data_ptr<uint8_t>();
  for (int64_t t = t0; t < t1; ++t) {
    alignas(64) float v[M][kTile];
    quant_tile<M, NF4>(w, a, m0, base + t * w.tile_bytes(), v, lut8);
    const int64_t n0 = t * kTile, count = std::min<int64_t>(kTile, w.n - n0);
    for (int m = 0; m < M; ++m) out.put(m0 + m, n0, v[m], count);
  }
}

#if defined(__AVX2__)
// Rows n0..n1 of a row-major 16-bit or float32 matrix for M float input rows starting at m0. Four
// accumulators per input row, so the multiply-adds of one row do not wait on each other.
template <int M, typename W>
void float_rows(const Matrix& w, const float* x, int64_t x_stride, int64_t m0, int64_t n0, int64_t n1, const Out& out) {
  const W* base = w.data.data_ptr<W>();
  const int64_t k = w.k;
  auto load = [](const W* p) {
    if constexpr (std::is_same_v<W, float>) {
      return _mm256_loadu_ps(p);
    } else {
      return load_bf16x8(reinterpret_cast<const uint16_t*>(p));
    }
  };
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = base + n * k;
    if (n + 4 < n1) {  // the row four ahead, a line at a time: more reads in flight (11.9 ms a token, not 16.3)
      const char* ahead = reinterpret_cast<const char*>(base + (n + 4) * k);
      for (int64_t b = 0; b < k * static_cast<int64_t>(sizeof(W)); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m256 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 wv = load(row + i + 8 * u);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + m) * x_stride + i + 8 * u), acc[m][u]);
      }
    }
    for (; i + 8 <= k; i += 8) {
      const __m256 wv = load(row + i);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + m) * x_stride + i), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      float v = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
      for (int64_t j = i; j < k; ++j) {
        float wj;
        if constexpr (std::is_same_v<W, float>) {
          wj = row[j];
        } else {
          wj = bf16_to_float(reinterpret_cast<const uint16_t*>(row)[j]);
        }
        v += wj * x[(m0 + m) * x_stride + j];
      }
      out.put(m0 + m, n, &v, 1);
    }
  }
}

#else
template <int M, typename W>
void float_rows(const Matrix& w, const float* x, int64_t x_stride, int64_t m0, int64_t n0, int64_t n1, const Out& out) {
  const W* base = w.data.data_ptr<W>();
  for (int64_t n = n0; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
      for (int64_t i = 0; i < w.k; ++i) {
        float wi;
        if constexpr (std::is_same_v<W, float>) {
          wi = base[n * w.k + i];
        } else {
          wi = bf16_to_float(reinterpret_cast<const uint16_t*>(base)[n * w.k + i]);
        }
        v += wi * x[(m0 + m) * x_stride + i];
      }
      out.put(m0 + m, n, &v, 1);
    }
  }
}

#endif

// Runs fn(integral_constant<M>, m0) over the input rows in passes of up to kPass.
template <typename F>
inline void passes(int64_t rows, F&& fn) {
  for (int64_t m0 = 0; m0 < rows; m0 += kPass) {
    switch (std::min<int64_t>(kPass, rows - m0)) {
      case 1: fn(std::integral_constant<int, 1>{}, m0); break;
      case 2: fn(std::integral_constant<int, 2>{}, m0); break;
      case 3: fn(std::integral_constant<int, 3>{}, m0); break;
      default: fn(std::integral_constant<int, 4>{}, m0); break;
    }
  }
}

#if defined(__AVX512F__)
// Rows n0..n1 of a bf16 matrix for M input rows already rounded to bf16 (xb, rows of k), by
// vdpbf16ps: 32 products a instruction, summed in float32. Only on CPUs with AVX512_BF16 (the
// caller checks: this build's other code runs without it).
template <int M>
__attribute__((target("avx512bf16"))) void bf16_dot_rows(const Matrix& w, const uint16_t* xb, int64_t m0, int64_t n0,
                                                        int64_t n1, const Out& out) {
  const uint16_t* base = reinterpret_cast<const uint16_t*>(w.data.data_ptr());
  const int64_t k = w.k;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = base + n * k;
    if (n + 4 < n1) {  // the row four ahead, a line at a time, as float_rows does
      const char* ahead = reinterpret_cast<const char*>(base + (n + 4) * k);
      for (int64_t b = 0; b < k * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {  // two chains per row, so one's multiply-adds do not wait on the other's
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + i), w1 = (__m512bh)_mm512_loadu_si512(row + i + 32);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const uint16_t* x = xb + (m0 + m) * k + i;
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x));
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(x + 32));
      }
    }
    if (i + 32 <= k) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + i);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xb + (m0 + m) * k + i));
      i += 32;
    }
    for (int m = 0; m < M; ++m) {
      float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
      for (int64_t j = i; j < k; ++j) v += bf16_to_float(row[j]) * bf16_to_float(xb[(m0 + m) * k + j]);
      out.put(m0 + m, n, &v, 1);
    }
  }
}
constexpr bool kBF16Dot = true;
#else
template <int M>
void bf16_dot_rows(const Matrix&, const uint16_t*, int64_t, int64_t, int64_t, const Out&) {}
constexpr bool kBF16Dot = false;
#endif

// Thread id's share of y = x @ W.T for `rows` input rows: x quantized (a), float (xf), or for a
// bf16 matrix where the CPU multiplies bf16, rounded to bf16 (xb, else nullptr).
void matmul_share(const Matrix& w, const Quantized& a, const float* xf, int64_t x_stride, int64_t rows, const Out& out,
                  const int8_t* lut8, int id, int n_threads, const uint16_t* xb = nullptr) {
  if (w.kind == kInt4 || w.kind == kNF4) {
    const auto [t0, t1] = share((w.n + kTile - 1) / kTile, id, n_threads);
    // tiles in runs of 4 (about 24 KB) so a run's codes stay in L1 while every pass of input rows reads them
    for (int64_t r0 = t0; r0 < t1; r0 += 4) {
      const int64_t r1 = std::min(t1, r0 + 4);
      passes(rows, [&](auto M, int64_t m0) {
        if (w.kind == kInt4) {
          quant_tiles<decltype(M)::value, false>(w, a, m0, r0, r1, out, lut8);
        } else {
          quant_tiles<decltype(M)::value, true>(w, a, m0, r0, r1, out, lut8);
        }
      });
    }
    return;
  }
  const auto [n0, n1] = share(w.n, id, n_threads);
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {
    const int64_t r1 = std::min(n1, r0 + 16);
    passes(rows, [&](auto M, int64_t m0) {
      if (w.kind == kBF16 && xb != nullptr) {
        bf16_dot_rows<decltype(M)::value>(w, xb, m0, r0, r1, out);
      } else if (w.kind == kBF16) {
        float_rows<decltype(M)::value, at::BFloat16>(w, xf, x_stride, m0, r0, r1, out);
      } else {
        float_rows<decltype(M)::value, float>(w, xf, x_stride, m0, r0, r1, out);
      }
    });
  }
}


// ---------------------------------------------------------------------------------------------
// A prompt chunk's attention, tiled (AVX-512 builds). A chunk's tokens share their slot's keys, so
// the queries of one kv head (tokens x group heads, up to kTileQueries) meet each key in one pass:
// scores are computed key-major, S[j][m], with the queries side by side in zmm lanes (Q transposed
// once), the softmax runs lane-wise, and the values are summed four queries at a time. The same
// float32 arithmetic as attend_head in another order: decoding and verification rows keep
// attend_head, so that verifying drafts equals decoding them bit for bit.
constexpr int kTileQueries = 48;  // three zmm of queries
constexpr int kTileVecs = kTileQueries / 16;

struct TileScratch {
  std::vector<float> qt, s;  // Q^T [dh, kTileQueries]; S [keys, kTileQueries]
};

#if defined(__AVX512F__)
constexpr bool kTiledAttention = true;

inline __m512 bcast16(const float* p) { return _mm512_set1_ps(*p); }
inline __m512 bcast16(const uint16_t* p) { return _mm512_set1_ps(bf16_to_float(*p)); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// e^x as exp8 computes it (the same polynomial), sixteen lanes at once; 2^n by vscalefps
inline __m512 exp16(__m512 x) {
  using namespace turnout;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLow)), _mm512_set1_ps(kExpHigh));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Queries qs[m] (dh floats, m < nq <= kTileQueries) over keys [0, lens[m]) of one kv head -> outs[m].
// dh must be a multiple of 16.
template <typename C>
void attend_tile(const float* const* qs, const int64_t* lens, int nq, const PagedRows<const C>& keys,
                 const PagedRows<const C>& values, int64_t dh, float scale, TileScratch& ts, float* const* outs) {
  int64_t lmax = 0;
  alignas(64) int32_t len32[kTileQueries];
  for (int m = 0; m < kTileQueries; ++m) {
    len32[m] = m < nq ? static_cast<int32_t>(lens[m]) : 1;  // a padding query reads one key, unused
    lmax = std::max<int64_t>(lmax, len32[m]);
  }
  ts.qt.assign(dh * kTileQueries, 0.f);
  for (int m = 0; m < nq; ++m)
    for (int64_t d = 0; d < dh; ++d) ts.qt[d * kTileQueries + m] = qs[m][d];
  const int64_t rows = (lmax + 3) / 4 * 4;
  ts.s.resize(rows * kTileQueries);
  float* S = ts.s.data();
  const __m512 scale_v = _mm512_set1_ps(scale);
  __m512i len_v[kTileVecs];
  __m512 top[kTileVecs];  // each query's largest score so far, over its own keys
  for (int v = 0; v < kTileVecs; ++v) {
    len_v[v] = _mm512_load_si512(len32 + 16 * v);
    top[v] = _mm512_set1_ps(-INFINITY);
  }
  // scores: four keys by the three query vectors per pass
  for (int64_t j0 = 0; j0 < lmax; j0 += 4) {
    const C* kr[4];
    for (int k = 0; k < 4; ++k) kr[k] = keys.row(std::min(j0 + k, lmax - 1));  // past lmax: a repeat, unread
    __m512 acc[4][kTileVecs];
    for (int k = 0; k < 4; ++k)
      for (int v = 0; v < kTileVecs; ++v) acc[k][v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dh; ++d) {
      const float* qd = ts.qt.data() + d * kTileQueries;
      const __m512 q0 = _mm512_loadu_ps(qd), q1 = _mm512_loadu_ps(qd + 16), q2 = _mm512_loadu_ps(qd + 32);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m512 kv = bcast16(kr[k] + d);
        acc[k][0] = _mm512_fmadd_ps(kv, q0, acc[k][0]);
        acc[k][1] = _mm512_fmadd_ps(kv, q1, acc[k][1]);
        acc[k][2] = _mm512_fmadd_ps(kv, q2, acc[k][2]);
      }
    }
    for (int k = 0; k < 4 && j0 + k < lmax; ++k) {
      const __m512i j_v = _mm512_set1_epi32(static_cast<int32_t>(j0 + k));
      for (int v = 0; v < kTileVecs; ++v) {
        const __m512 sv = _mm512_mul_ps(acc[k][v], scale_v);
        _mm512_storeu_ps(S + (j0 + k) * kTileQueries + 16 * v, sv);
        top[v] = _mm512_mask_max_ps(top[v], _mm512_cmpgt_epi32_mask(len_v[v], j_v), top[v], sv);
      }
    }
  }
  // softmax down each lane (a query), keys past its length masked out
  alignas(64) float inv[kTileQueries];
  for (int v = 0; v < kTileVecs; ++v) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < lmax; ++j) {
      const __mmask16 live = _mm512_cmpgt_epi32_mask(len_v[v], _mm512_set1_epi32(static_cast<int32_t>(j)));
      float* sj = S + j * kTileQueries + 16 * v;
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(sj), top[v])));
      _mm512_storeu_ps(sj, e);
      total = _mm512_add_ps(total, e);
    }
    _mm512_store_ps(inv + 16 * v, _mm512_div_ps(_mm512_set1_ps(1.f), total));
  }
  // values: four queries by 64 output values per pass
  for (int m0 = 0; m0 < nq; m0 += 4) {
    const int nm = std::min(4, nq - m0);
    int64_t span = 0;
    for (int mm = 0; mm < nm; ++mm) span = std::max<int64_t>(span, len32[m0 + mm]);
    for (int64_t c0 = 0; c0 < dh; c0 += 64) {
      const int nu = static_cast<int>(std::min<int64_t>(4, (dh - c0) / 16));
      __m512 acc[4][4];
      for (int mm = 0; mm < 4; ++mm)
        for (int u = 0; u < 4; ++u) acc[mm][u] = _mm512_setzero_ps();
      for (int64_t j = 0; j < span; ++j) {
        __m512 vv[4];
        const C* vr = values.row(j) + c0;
        for (int u = 0; u < nu; ++u) vv[u] = load16(vr + 16 * u);
        const float* pj = S + j * kTileQueries + m0;
        for (int mm = 0; mm < nm; ++mm) {
          const __m512 p = _mm512_set1_ps(pj[mm]);
          for (int u = 0; u < nu; ++u) acc[mm][u] = _mm512_fmadd_ps(p, vv[u], acc[mm][u]);
        }
      }
      for (int mm = 0; mm < nm; ++mm) {
        const __m512 scale_m = _mm512_set1_ps(inv[m0 + mm]);
        for (int u = 0; u < nu; ++u) _mm512_storeu_ps(outs[m0 + mm] + c0 + 16 * u, _mm512_mul_ps(acc[mm][u], scale_m));
      }
    }
  }
}
#else
constexpr bool kTiledAttention = false;
template <typename C>
void attend_tile(const float* const*, const int64_t*, int, const PagedRows<const C>&, const PagedRows<const C>&,
                 int64_t, float, TileScratch&, float* const*) {}
#endif
// ---------------------------------------------------------------------------------------------
// The index of the largest of x[0..n), the first of equals (as torch.argmax): a vector maximum, then
// the first lane that holds it.
inline int64_t argmax_row(const float* x, int64_t n) {
  float top = -INFINITY;
  int64_t i = 0;
#if defined(__AVX2__)
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (float v : lanes) top = std::max(top, v);
#endif
  for (; i < n; ++i) top = std::max(top, x[i]);
  for (i = 0; i < n; ++i)
    if (x[i] == top) return i;
  return 0;  // every value NaN
}

// ---------------------------------------------------------------------------------------------
struct Layer {
  torch::Tensor attn_norm, ffn_norm;  // float32 [D]
  Matrix wqkv, wo, w13, w2;
  torch::Tensor k_cache, v_cache;  // [pages, KV, P, Dh] (pages may be strided), float32 or bf16
};

class Step {
 public:
  Step(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden, double eps, torch::Tensor cos,
       torch::Tensor sin, torch::Tensor final_norm, torch::Tensor lut8, int64_t threads)
      : n_heads_(n_heads), n_kv_(n_kv_heads), dh_(head_dim), hidden_(hidden), eps_(static_cast<float>(eps)),
        cos_(cos.contiguous().to(torch::kFloat)), sin_(sin.contiguous().to(torch::kFloat)),
        final_norm_(final_norm.contiguous().to(torch::kFloat)), lut8_(lut8.contiguous()), pool_(shared_pool(static_cast<int>(std::max<int64_t>(1, threads)))) {
    TORCH_CHECK(lut8_.numel() == 16 && lut8_.scalar_type() == torch::kChar, "step: the nf4 code book must be 16 int8 values");
    TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim && n_heads % n_kv_heads == 0, "step: unsupported head layout");
    dim_ = final_norm_.numel();
  }

  void add_layer(torch::Tensor attn_norm, torch::Tensor ffn_norm, const std::vector<torch::Tensor>& wqkv,
                 const std::vector<torch::Tensor>& wo, const std::vector<torch::Tensor>& w13,
                 const std::vector<torch::Tensor>& w2, torch::Tensor k_cache, torch::Tensor v_cache) {
    Layer l;
    l.attn_norm = attn_norm.contiguous().to(torch::kFloat);
    l.ffn_norm = ffn_norm.contiguous().to(torch::kFloat);
    l.wqkv = matrix(wqkv, kRoleQKV);
    l.wo = matrix(wo, kRoleWo);
    l.w13 = matrix(w13, kRoleW13);
    l.w2 = matrix(w2, kRoleW2);
    if (!layers_.empty()) {  // the shared activation buffers are sized from the first layer's
      const Layer& first = layers_[0];
      for (auto [m, f] : {std::pair{&l.wqkv, &first.wqkv}, {&l.wo, &first.wo}, {&l.w13, &first.w13}, {&l.w2, &first.w2}})
        TORCH_CHECK(m->kind == f->kind && m->kp == f->kp && m->group == f->group, "step: every layer must be quantized alike");
    }
    for (const auto& c : {k_cache, v_cache})
      TORCH_CHECK(c.dim() == 4 && c.size(1) == n_kv_ && c.size(3) == dh_ && c.stride(3) == 1 && c.stride(2) == dh_ && c.stride(1) == c.size(2) * dh_ && c.sizes() == k_cache.sizes() && c.stride(0) == k_cache.stride(0),
                  "step: caches must be pages [pages, KV, P, Dh], each page contiguous");
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kBFloat16, "step: caches must be float32 or bf16");
    TORCH_CHECK(l.wqkv.n == (n_heads_ + 2 * n_kv_) * dh_ && l.w13.n == 2 * hidden_ && l.w2.k == hidden_, "step: layer shapes do not match the model");
    l.k_cache = k_cache;
    l.v_cache = v_cache;
    layers_.push_back(std::move(l));
  }

  void set_output(const std::vector<torch::Tensor>& output) { output_ = matrix(output, kRoleHead); }

  // An input projection (a draft head's fusion): forward's x is then [T, K] and the first layer
  // reads x W^T + bias [T, D] instead
  void set_input(const std::vector<torch::Tensor>& input, torch::Tensor bias) {
    Matrix w = matrix(input, kRoleInput);
    TORCH_CHECK(w.n == dim_ && bias.numel() == dim_, "step: the input projection must map to the model width");
    input_ = w;
    input_bias_ = bias.contiguous().to(torch::kFloat);
  }

  // The page table [slots, pages per sequence] (int32, updated in place by its owner between
  // steps): position p of a slot is entry p % P of page table[slot, p / P] of every layer's cache.
  void set_pages(torch::Tensor table, int64_t page_size) {
    TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kInt && table.is_contiguous(), "step: the page table must be contiguous int32 [slots, pages]");
    TORCH_CHECK(page_size > 0 && (page_size & (page_size - 1)) == 0, "step: the page size must be a power of two");
    for (const Layer& l : layers_) TORCH_CHECK(l.k_cache.size(2) == page_size, "step: the caches' pages hold ", l.k_cache.size(2), " tokens, not ", page_size);
    table_ = table;
    shift_ = 0;
    while ((int64_t{1} << shift_) < page_size) ++shift_;
  }

  // x [T, D] embeddings of the step's tokens (or the input projection's [T, K] inputs) at
  // positions[T] of slots[T] -> (logits [H, V], the final-normed hidden states [H, D] the LM head
  // read, or the residual rows before the norm: set_residual_hidden) of the last H = T - head_from
  // rows (a prompt chunk needs only its last token's)
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> forward(torch::Tensor x, torch::Tensor positions,
                                                                  torch::Tensor slots, int64_t head_from) {
    TORCH_CHECK(output_.n > 0 && !layers_.empty(), "step: the model is not complete");
    x = x.contiguous().to(torch::kFloat);
    positions = positions.contiguous().to(torch::kLong);
    slots = slots.contiguous().to(torch::kLong);
    const int64_t t_count = x.size(0);
    const int64_t x_width = input_.n > 0 ? input_.k : dim_;
    TORCH_CHECK(x.dim() == 2 && x.size(1) == x_width && positions.numel() == t_count && slots.numel() == t_count, "step: x must be [T, ", x_width, "] with a position and a slot per row");
    TORCH_CHECK(table_.defined(), "step: no page table (set_pages)");
    const int64_t *pos = positions.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
    const int64_t n_pages = layers_[0].k_cache.size(0), per_seq = table_.size(1);
    const int32_t* table = table_.data_ptr<int32_t>();
    for (int64_t t = 0; t < t_count; ++t) {
      TORCH_CHECK(pos[t] >= 0 && (pos[t] >> shift_) < per_seq && pos[t] < cos_.size(0), "step: position ", pos[t], " is outside the cache");
      TORCH_CHECK(slot[t] >= 0 && slot[t] < table_.size(0), "step: slot ", slot[t], " does not exist");
      for (int64_t i = 0; i <= pos[t] >> shift_; ++i) {
        const int32_t page = table[slot[t] * per_seq + i];
        TORCH_CHECK(page >= 0 && page < n_pages, "step: slot ", slot[t], " names page ", page, " of ", n_pages);
      }
    }
    TORCH_CHECK(head_from >= 0 && head_from <= t_count, "step: head_from must be within the rows");
    auto logits = torch::empty({t_count - head_from, output_.n}, torch::kFloat);
    auto hidden = torch::empty({t_count - head_from, dim_}, torch::kFloat);
    auto best = torch::empty({t_count - head_from}, torch::kLong);
    if (t_count == 0) return {logits, hidden, best};
    State s;
    s.t = t_count;
    s.head_from = head_from;
    s.tiled = head_from > 0 && prompt_chunk(pos, slot, t_count);
    s.pos = pos;
    s.slot = slot;
    if (input_.n > 0) {
      s.x_in = x;
      s.x = input_bias_.expand({t_count, dim_}).clone();  // the projection adds itself to its bias
    } else {
      s.x = x.clone();
    }
    const int64_t qkv_w = (n_heads_ + 2 * n_kv_) * dh_;
    s.qkv.resize(t_count * qkv_w);
    s.attn.resize(t_count * n_heads_ * dh_);
    s.h13.resize(t_count * 2 * hidden_);
    s.act.resize(t_count * hidden_);
    if (t_count >= kShareRows) {
      const Layer& first = layers_[0];
      for (const Matrix* m : {&first.wqkv, &first.wo, &first.w13, &first.w2, static_cast<const Matrix*>(&output_), static_cast<const Matrix*>(&input_)})
        if (m->n > 0 && (m->kind == kInt4 || m->kind == kNF4)) s.shared[m->role].size_for(t_count, m->kp, m->group);
    }
    s.normed.resize(t_count * dim_);
    s.logits = logits.data_ptr<float>();
    s.hidden = hidden.data_ptr<float>();
    s.best = best.data_ptr<int64_t>();
    if (static_cast<int>(scratch_.size()) != pool_->size()) scratch_.resize(pool_->size());
    pool_->run([&](int id) { run(s, id); });
    return {logits, hidden, best};
  }

  int64_t threads() const { return pool_->size(); }

  // bf16 matrices by vdpbf16ps (their inputs rounded to bf16), or widened to float32 in registers.
  // The caller turns it on only where the CPU has AVX512_BF16; it needs an AVX-512 build.
  void set_bf16_dot(bool on) {
    TORCH_CHECK(!on || kBF16Dot, "step: bf16 dot products need the avx512 build");
    bf16_dot_ = on;
  }
  bool bf16_dot() const { return bf16_dot_; }

  // forward's hidden states: the residual stream before the final norm (a draft head chains on
  // it) instead of the final-normed rows the LM head read
  void set_residual_hidden(bool on) { residual_hidden_ = on; }

  // Turn the per-stage clock of thread 0 on (and zero it) or off; stage_seconds() reads it.
  void profile(bool on) {
    profile_ = on;
    std::fill(std::begin(stage_seconds_), std::end(stage_seconds_), 0.0);
  }
  std::map<std::string, double> stage_seconds() const {
    std::map<std::string, double> out;
    for (int i = 0; i < kStages; ++i) out[kStageNames[i]] = stage_seconds_[i];
    return out;
  }

 private:
  struct State {
    int64_t t = 0, head_from = 0;
    bool tiled = false;  // a prompt chunk: its attention takes attend_tile
    const int64_t *pos = nullptr, *slot = nullptr;
    torch::Tensor x;     // [T, D] the residual stream
    torch::Tensor x_in;  // [T, K] the input projection's input, where there is one
    std::vector<float> qkv, attn, h13, act, normed;
    Quantized shared[kRoles];  // each input's activations, quantized by all threads (kShareRows rows and up)
    float* logits = nullptr;
    float* hidden = nullptr;
    int64_t* best = nullptr;  // each logits row's argmax
  };
  struct Scratch {
    Quantized a;
    std::vector<float> normed, scores;
    std::vector<uint16_t> xb;  // a bf16 matrix's input rounded to bf16 (the vdpbf16ps path)
    TileScratch tile;
  };

  Matrix matrix(const std::vector<torch::Tensor>& parts, int role) {
    // [kind, packed or weight, n, k, kp, group] as tensors from Python: kind/n/k/kp/group packed
    // into one int64 tensor so the binding stays small
    TORCH_CHECK(parts.size() == 2, "step: a matrix is (meta, data)");
    const auto meta = parts[0].contiguous().to(torch::kLong);
    const int64_t* mp = meta.data_ptr<int64_t>();
    Matrix w;
    w.role = role;
    w.kind = static_cast<Kind>(mp[0]);
    w.n = mp[1];
    w.k = mp[2];
    w.kp = mp[3];
    w.group = mp[4];
    w.data = parts[1].contiguous();
    if (w.kind == kInt4 || w.kind == kNF4) {
      TORCH_CHECK(w.group % kBlock == 0 && w.kp % w.group == 0, "step: groups must be whole blocks of 32");
      TORCH_CHECK(w.data.scalar_type() == torch::kByte && w.data.numel() == (w.n + kTile - 1) / kTile * w.tile_bytes(), "step: packed weight has the wrong size");
    } else {
      TORCH_CHECK(w.data.dim() == 2 && w.data.size(0) == w.n && w.data.size(1) == w.k, "step: float weight has the wrong shape");
      TORCH_CHECK((w.kind == kBF16 && w.data.scalar_type() == torch::kBFloat16) || (w.kind == kF32 && w.data.scalar_type() == torch::kFloat), "step: float weight has the wrong dtype");
    }
    return w;
  }

  // RMSNorm of every row of x [T, D] into out (every thread does all rows: they are few and short)
  void norm_rows(const float* x, const torch::Tensor& weight, int64_t t_count, float* out) const {
    const float* wp = weight.data_ptr<float>();
    for (int64_t t = 0; t < t_count; ++t) {
      const float* xr = x + t * dim_;
      const float inv = 1.f / std::sqrt(dot(xr, xr, dim_) / static_cast<float>(dim_) + eps_);
      for (int64_t i = 0; i < dim_; ++i) out[t * dim_ + i] = xr[i] * inv * wp[i];
    }
  }

  // Rows [r0, r1) of the input of w, quantized into a (sized for w by size_for).
  static void quantize_rows(const Matrix& w, const float* x, int64_t k, int64_t r0, int64_t r1, Quantized& a) {
    for (int64_t t = r0; t < r1; ++t) {
      quantize_row(x + t * k, k, a, t);
      a.finish_row(t, w.group, w.kind == kInt4 ? 8 : kNF4Offset);
    }
  }

  template <typename C>
  void rope_store(State& s, const Layer& l, int id) {
    const int64_t heads = n_heads_ + 2 * n_kv_, qkv_w = heads * dh_, half = dh_ / 2;
    const float *cp = cos_.data_ptr<float>(), *sp = sin_.data_ptr<float>();
    const auto [begin, end] = share(s.t * heads, id, pool_->size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / heads, h = task % heads;
      float* x = s.qkv.data() + t * qkv_w + h * dh_;
      if (h >= n_heads_ + n_kv_) {  // a value: stored as it is
        C* dst = rows<C>(l.v_cache, s.slot[t], h - n_heads_ - n_kv_).row(s.pos[t]);
        for (int64_t i = 0; i < dh_; ++i) dst[i] = turnout::store_as<C>(x[i]);
        continue;
      }
      const float *c = cp + s.pos[t] * dh_, *sn = sp + s.pos[t] * dh_;
      float rotated[kMaxHeadDim];
      for (int64_t i = 0; i < half; ++i) {
        rotated[i] = x[i] * c[i] - x[i + half] * sn[i];
        rotated[i + half] = x[i + half] * c[i + half] + x[i] * sn[i + half];
      }
      if (h < n_heads_) {
        std::memcpy(x, rotated, dh_ * sizeof(float));  // the query, rotated in place
      } else {
        C* dst = rows<C>(l.k_cache, s.slot[t], h - n_heads_).row(s.pos[t]);
        for (int64_t i = 0; i < dh_; ++i) dst[i] = turnout::store_as<C>(rotated[i]);
      }
    }
  }

  // The rows of slot's kv head in a layer's cache (C const or not)
  template <typename C>
  PagedRows<C> rows(const torch::Tensor& cache, int64_t slot, int64_t kv_head) const {
    using Raw = std::remove_const_t<C>;
    Raw* base = reinterpret_cast<Raw*>(cache.data_ptr()) + kv_head * cache.stride(1);
    return {base, table_.data_ptr<int32_t>() + slot * table_.size(1), cache.stride(0), shift_, dh_};
  }


  // A chunk of one sequence's prompt: one slot, consecutive positions, and a head group that fits a tile.
  bool prompt_chunk(const int64_t* pos, const int64_t* slot, int64_t t_count) const {
    if (!kTiledAttention || t_count < 2 || dh_ % 16 != 0 || n_heads_ / n_kv_ > kTileQueries) return false;
    for (int64_t t = 1; t < t_count; ++t)
      if (slot[t] != slot[0] || pos[t] != pos[0] + t) return false;
    return true;
  }

  // attend_tile over tasks of (kv head, a block of tokens whose group heads fill a tile)
  template <typename C>
  void attend_chunk(State& s, const Layer& l, Scratch& sc, int id) {
    const int64_t qkv_w = (n_heads_ + 2 * n_kv_) * dh_, group = n_heads_ / n_kv_;
    const int64_t per_task = kTileQueries / group, blocks = (s.t + per_task - 1) / per_task;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh_)));
    const auto [begin, end] = share(n_kv_ * blocks, id, pool_->size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kh = task / blocks, t0 = task % blocks * per_task, t1 = std::min(s.t, t0 + per_task);
      const float* qs[kTileQueries];
      float* outs[kTileQueries];
      int64_t lens[kTileQueries];
      int nq = 0;
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t g = 0; g < group; ++g, ++nq) {
          const int64_t h = kh * group + g;
          qs[nq] = s.qkv.data() + t * qkv_w + h * dh_;
          outs[nq] = s.attn.data() + (t * n_heads_ + h) * dh_;
          lens[nq] = s.pos[t] + 1;
        }
      }
      attend_tile(qs, lens, nq, rows<const C>(l.k_cache, s.slot[0], kh), rows<const C>(l.v_cache, s.slot[0], kh), dh_,
                  scale, sc.tile, outs);
    }
  }

  template <typename C>
  void attend(State& s, const Layer& l, Scratch& sc, int id) {
    if (s.tiled) {
      attend_chunk<C>(s, l, sc, id);
      return;
    }
    const int64_t qkv_w = (n_heads_ + 2 * n_kv_) * dh_, group = n_heads_ / n_kv_;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh_)));  // as kernels/decode.py
    const auto [begin, end] = share(s.t * n_heads_, id, pool_->size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / n_heads_, h = task % n_heads_, len = s.pos[t] + 1;
      if (static_cast<int64_t>(sc.scores.size()) < len) sc.scores.resize(len);
      const float* q = s.qkv.data() + t * qkv_w + h * dh_;
      turnout::attend_head<C>(q, rows<const C>(l.k_cache, s.slot[t], h / group), rows<const C>(l.v_cache, s.slot[t], h / group),
                              len, dh_, scale, sc.scores.data(), s.attn.data() + task * dh_);
    }
  }


  // Where thread 0's time goes, by stage, when profiling is on (a barrier's wait is its own stage).
  enum Stage { kNorm, kQuantize, kQKV, kRope, kAttention, kWo, kW13, kSilu, kW2, kHead, kWait, kInput, kStages };
  static constexpr const char* kStageNames[kStages] = {"norm", "quantize", "qkv",  "rope_store", "attention", "wo",
                                                       "gate_up", "silu", "down", "lm_head", "barrier", "input"};
  struct Clock {
    bool on = false;
    std::chrono::steady_clock::time_point last;
    double* seconds = nullptr;
    void mark(Stage stage) {
      if (!on) return;
      const auto now = std::chrono::steady_clock::now();
      seconds[stage] += std::chrono::duration<double>(now - last).count();
      last = now;
    }
  };

  void run(State& s, int id) {
    Scratch& sc = scratch_[id];
    const int64_t t = s.t, qkv_w = (n_heads_ + 2 * n_kv_) * dh_;
    float* x = s.x.data_ptr<float>();
    sc.normed.resize(t * std::max(dim_, hidden_));
    Clock clock{profile_ && id == 0, std::chrono::steady_clock::now(), stage_seconds_};
    auto sync = [&] {
      pool_->sync();
      clock.mark(kWait);
    };
    // A few rows: every thread quantizes all of them into its own buffer, with no barrier. Many
    // (a prompt chunk): each quantizes its share into the step's shared buffer, then they meet.
    auto matmul = [&](const Matrix& w, const float* in, int64_t k, const Out& out, Stage stage, int64_t rows) {
      Quantized* a = &sc.a;
      if (w.kind == kInt4 || w.kind == kNF4) {
        if (rows >= kShareRows) {
          a = &s.shared[w.role];
          const auto [r0, r1] = share(rows, id, pool_->size());
          quantize_rows(w, in, k, r0, r1, *a);
          clock.mark(kQuantize);
          sync();
        } else {
          sc.a.size_for(rows, w.kp, w.group);
          quantize_rows(w, in, k, 0, rows, sc.a);
          clock.mark(kQuantize);
        }
      }
      const uint16_t* xb = nullptr;
      if (w.kind == kBF16 && bf16_dot_) {  // every thread rounds all rows (few) into its own buffer
        sc.xb.resize(rows * k);
        for (int64_t i = 0; i < rows * k; ++i) sc.xb[i] = float_to_bf16(in[i]);
        xb = sc.xb.data();
        clock.mark(kQuantize);
      }
      matmul_share(w, *a, in, k, rows, out, lut8_.data_ptr<int8_t>(), id, pool_->size(), xb);
      clock.mark(stage);
    };
    if (input_.n > 0) {
      matmul(input_, s.x_in.data_ptr<float>(), input_.k, Out{x, dim_, true}, kInput, t);
      sync();
    }
    for (const Layer& l : layers_) {
      const bool bf16 = l.k_cache.scalar_type() == torch::kBFloat16;
      norm_rows(x, l.attn_norm, t, sc.normed.data());
      clock.mark(kNorm);
      matmul(l.wqkv, sc.normed.data(), dim_, Out{s.qkv.data(), qkv_w, false}, kQKV, t);
      sync();
      bf16 ? rope_store<uint16_t>(s, l, id) : rope_store<float>(s, l, id);
      clock.mark(kRope);
      sync();
      bf16 ? attend<uint16_t>(s, l, sc, id) : attend<float>(s, l, sc, id);
      clock.mark(kAttention);
      sync();
      matmul(l.wo, s.attn.data(), n_heads_ * dh_, Out{x, dim_, true}, kWo, t);
      sync();
      norm_rows(x, l.ffn_norm, t, sc.normed.data());
      clock.mark(kNorm);
      matmul(l.w13, sc.normed.data(), dim_, Out{s.h13.data(), 2 * hidden_, false}, kW13, t);
      sync();
      const float* act = silu_mul(s, sc, id);
      clock.mark(kSilu);
      if (t >= kShareRows) sync();
      matmul(l.w2, act, hidden_, Out{x, dim_, true}, kW2, t);
      sync();
    }
    const int64_t head = t - s.head_from;
    norm_rows(x + s.head_from * dim_, final_norm_, head, sc.normed.data());
    const float* kept = residual_hidden_ ? x + s.head_from * dim_ : sc.normed.data();
    if (id == 0) std::memcpy(s.hidden, kept, head * dim_ * sizeof(float));
    clock.mark(kNorm);
    matmul(output_, sc.normed.data(), dim_, Out{s.logits, output_.n, false}, kHead, head);
    sync();
    const auto [r0, r1] = share(head, id, pool_->size());  // the greedy token of each row, for the sampler
    for (int64_t r = r0; r < r1; ++r) s.best[r] = argmax_row(s.logits + r * output_.n, output_.n);
    clock.mark(kHead);
  }

  // silu(gate) * up of every row (the w2 input): a few rows by every thread into its own buffer, many
  // split among the threads into the shared one (the caller meets the others before reading it)
  const float* silu_mul(State& s, Scratch& sc, int id) const {
    const bool split = s.t >= kShareRows;
    float* out = split ? s.act.data() : sc.normed.data();
    const auto [r0, r1] = split ? share(s.t, id, pool_->size()) : std::pair<int64_t, int64_t>{0, s.t};
    for (int64_t t = r0; t < r1; ++t) {
      const float* gate = s.h13.data() + t * 2 * hidden_;
      turnout::silu_mul_row(gate, gate + hidden_, out + t * hidden_, hidden_);
    }
    return out;
  }


  const int64_t n_heads_, n_kv_, dh_, hidden_;
  const float eps_;
  torch::Tensor cos_, sin_, final_norm_, lut8_;
  int64_t dim_ = 0;
  std::vector<Layer> layers_;
  Matrix output_;
  Matrix input_;  // n == 0: none
  torch::Tensor input_bias_;
  torch::Tensor table_;  // [slots, pages per sequence] int32: each slot's pages
  int shift_ = 0;        // log2 of the page size
  std::shared_ptr<Pool> pool_;
  std::vector<Scratch> scratch_;
  bool profile_ = false;
  bool bf16_dot_ = false;
  bool residual_hidden_ = false;
  double stage_seconds_[kStages] = {};
};

// ---------------------------------------------------------------------------------------------
// Repacking from the reference layouts (codes [N, Kp/2], even column in the low nibble).
inline uint8_t code_at(const uint8_t* row, int64_t col) {
  const uint8_t byte = row[col / 2];
  return col & 1 ? byte >> 4 : byte & 15;
}

template <typename Header>
torch::Tensor pack_tiles(const torch::Tensor& codes, int64_t group, Header&& header) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kByte, "pack: codes must be uint8 [N, Kp/2]");
  TORCH_CHECK(group % kBlock == 0, "pack: the group / block size must be a multiple of 32");
  const auto c = codes.contiguous();
  const int64_t n = c.size(0), kp = c.size(1) * 2, groups = kp / group, per_group = group / kBlock;
  const int64_t tile_bytes = groups * (kHeader + per_group * kChunk), tiles = (n + kTile - 1) / kTile;
  auto out = torch::zeros({tiles * tile_bytes}, torch::kByte);
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* cp = c.data_ptr<uint8_t>();
  for (int64_t t = 0; t < tiles; ++t) {
    uint8_t* tile = o + t * tile_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = 0; r < kTile && t * kTile + r < n; ++r) header(tile, t * kTile + r, r, g);
      tile += kHeader;
      for (int64_t p = 0; p < per_group; ++p, tile += kChunk) {
        const int64_t col0 = (g * per_group + p) * kBlock;
        for (int64_t r = 0; r < kTile && t * kTile + r < n; ++r) {
          const uint8_t* row = cp + (t * kTile + r) * (kp / 2);
          for (int cc = 0; cc < 4; ++cc)
            for (int j = 0; j < 4; ++j)
              tile[64 * cc + 4 * r + j] = code_at(row, col0 + 8 * cc + j) | code_at(row, col0 + 8 * cc + 4 + j) << 4;
        }
      }
    }
  }
  return out;
}

torch::Tensor pack_int4(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros, int64_t group) {
  TORCH_CHECK(scales.scalar_type() == torch::kBFloat16 && zeros.scalar_type() == torch::kBFloat16, "pack_int4: scales and zeros must be bf16");
  const auto s = scales.contiguous(), z = zeros.contiguous();
  const int64_t groups = s.size(1);
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  const auto* zp = reinterpret_cast<const uint16_t*>(z.data_ptr<at::BFloat16>());
  return pack_tiles(codes, group, [&](uint8_t* tile, int64_t row, int64_t r, int64_t g) {
    std::memcpy(tile + 2 * r, sp + row * groups + g, 2);
    std::memcpy(tile + 32 + 2 * r, zp + row * groups + g, 2);
  });
}

torch::Tensor pack_nf4(torch::Tensor codes, torch::Tensor absmax, c10::optional<torch::Tensor> chunk_scale, double offset,
                       int64_t block) {
  const auto am = absmax.contiguous();
  const c10::optional<torch::Tensor> cs = chunk_scale.has_value() ? c10::optional<torch::Tensor>(chunk_scale->contiguous()) : c10::nullopt;
  const turnout::NF4Scales scales = turnout::make_nf4_scales(am, cs, offset);
  return pack_tiles(codes, block, [&](uint8_t* tile, int64_t row, int64_t r, int64_t g) {
    const float v = scales.at(row, g) / 127.f;
    std::memcpy(tile + 4 * r, &v, 4);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, int64_t>())
      .def("add_layer", &Step::add_layer)
      .def("set_output", &Step::set_output)
      .def("set_input", &Step::set_input)
      .def("set_pages", &Step::set_pages)
      .def("forward", &Step::forward, pybind11::arg("x"), pybind11::arg("positions"), pybind11::arg("slots"),
           pybind11::arg("head_from") = 0, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("profile", &Step::profile)
      .def("set_bf16_dot", &Step::set_bf16_dot)
      .def("bf16_dot", &Step::bf16_dot)
      .def("set_residual_hidden", &Step::set_residual_hidden)
      .def("stage_seconds", &Step::stage_seconds)
      .def_property_readonly("threads", &Step::threads);
  m.def("pack_int4", &pack_int4, "int4 reference layout -> the step's tiles of 8 rows");
  m.def("pack_nf4", &pack_nf4, "nf4 reference layout -> the step's tiles of 8 rows");
  m.def("tile_bytes", [](int64_t kp, int64_t group) { return kp / group * (kHeader + group / kBlock * kChunk); });
}
