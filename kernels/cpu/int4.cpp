// Dequantize PyTorch's packed int4 CPU weight (the layout _convert_weight_to_int4pack_for_cpu
// writes) into a float32 W^T, for prefill: wide inputs run faster as one float32 GEMM than
// through the packed kernel, and the packed weight stays the only copy held.
#include <torch/extension.h>
#include <ATen/Parallel.h>

// packed: uint8 [Np, Kp/2], read as [Np/block_n, Kp, block_n/2]: byte j of (block, k) holds row j
// of the block in its low nibble and row j + block_n/2 in its high nibble.
// scales_and_zeros: bf16 [Kp/group, Np, 2], w = (code - 8) * scale + zero.
// Returns float32 W^T [Kp, Np].
torch::Tensor int4_dequantize_t(torch::Tensor packed, torch::Tensor scales_and_zeros, int64_t group,
                                int64_t block_n) {
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous(), "int4: packed must be contiguous uint8");
  TORCH_CHECK(scales_and_zeros.scalar_type() == torch::kBFloat16 && scales_and_zeros.is_contiguous(),
              "int4: scales_and_zeros must be contiguous bf16");
  const int64_t n_rows = packed.size(0), kp = packed.size(1) * 2, half = block_n / 2;
  TORCH_CHECK(n_rows % block_n == 0 && kp % group == 0, "int4: shape does not match the packed layout");
  auto sz = scales_and_zeros.to(torch::kFloat);  // [G, Np, 2], small
  auto scales = sz.select(2, 0).contiguous(), zeros = sz.select(2, 1).contiguous();  // [G, Np] each
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  auto out = torch::empty({kp, n_rows}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  at::parallel_for(0, kp, 16, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      const float* s = sp + (k / group) * n_rows;
      const float* z = zp + (k / group) * n_rows;
      float* row = op + k * n_rows;
      for (int64_t b = 0; b < n_rows / block_n; ++b) {
        const uint8_t* bytes = p + (b * kp + k) * half;
        const int64_t lo = b * block_n, hi = lo + half;
        for (int64_t j = 0; j < half; ++j) {  // contiguous in j: the compiler vectorises these
          row[lo + j] = (static_cast<float>(bytes[j] & 15) - 8.f) * s[lo + j] + z[lo + j];
        }
        for (int64_t j = 0; j < half; ++j) {
          row[hi + j] = (static_cast<float>(bytes[j] >> 4) - 8.f) * s[hi + j] + z[hi + j];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_dequantize_t", &int4_dequantize_t, "packed int4 CPU weight -> float32 W^T");
}
