// NF4 block scales as both CPU kernels read them: plain float32, or (double quantization) int8
// with one float32 per 256 blocks plus an offset.
#pragma once
#include <torch/extension.h>

namespace turnout {

struct NF4Scales {
  const float* absmax = nullptr;
  const int8_t* qabsmax = nullptr;
  const float* chunk_scale = nullptr;
  float offset = 0.f;
  int64_t blocks_per_row = 0;
  // The scale of block b of row n.
  float at(int64_t n, int64_t b) const {
    const int64_t i = n * blocks_per_row + b;
    if (absmax) return absmax[i];
    return static_cast<float>(qabsmax[i]) * chunk_scale[i / 256] + offset;
  }
};

inline NF4Scales make_nf4_scales(const torch::Tensor& absmax, const c10::optional<torch::Tensor>& chunk_scale,
                                 double offset) {
  NF4Scales s;
  s.blocks_per_row = absmax.size(1);
  if (absmax.scalar_type() == torch::kFloat) {
    s.absmax = absmax.data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kChar && chunk_scale.has_value(),
                "nf4: int8 block scales need their float32 chunk scales");
    s.qabsmax = absmax.data_ptr<int8_t>();
    s.chunk_scale = chunk_scale->data_ptr<float>();
    s.offset = static_cast<float>(offset);
  }
  return s;
}

}  // namespace turnout
