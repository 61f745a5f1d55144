// LAMB's step for unsharded float32/float64 CPU tensors, two passes over memory per tensor.
//
// torch has no fused CPU LAMB, and a step composed of its ops makes extra passes (a scratch copy of x, the norms, the
// update), each with only one or two memory streams, which leaves most of the bandwidth unused. Here pass 1 reads
// x, g, m, v, writes m, v and sums x^2 and u^2; the trust ratio follows from the two sums; pass 2 recomputes u from
// the new moments (the same expression, so the update applies exactly the u whose norm was taken) and writes x.
// Built on first use by lightning_effi.optim.cpu_kernel.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Per-tensor row of the float64 hyperparameter table, in this order (BIAS_CORRECTION and ADAPT: 1 or 0).
enum Col { LR, B1, B2, EPS, WD, BIAS_CORRECTION, ADAPT, WLO, WHI, TLO, THI, NCOL };

// Partial sums are taken per block of this many elements, in T, then added in double: the sums do not depend on
// the thread count, and no float accumulator sees more than a block.
constexpr int64_t kBlock = 1 << 14;

// Plain functions with restrict pointers and scalars by value: inside a lambda that captures by reference the
// compiler cannot rule out aliasing and vectorises with gathers and scatters.
template <typename T>
void moments_and_sums(T* __restrict x, const T* __restrict g, T* __restrict m, T* __restrict v, int64_t begin,
                      int64_t end, T coef, T b1, T b2, T eps, T wd, T inv_bc1, T inv_sqrt_bc2, double* xsq,
                      double* usq) {
  const T ob1 = T(1) - b1, ob2 = T(1) - b2;
  T sx = 0, su = 0;
#pragma omp simd reduction(+ : sx, su)
  for (int64_t i = begin; i < end; ++i) {
    const T gi = g[i] * coef;
    const T mi = b1 * m[i] + ob1 * gi;
    const T vi = b2 * v[i] + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const T xi = x[i];
    const T ui = (mi * inv_bc1) / (std::sqrt(vi) * inv_sqrt_bc2 + eps) + wd * xi;
    sx += xi * xi;
    su += ui * ui;
  }
  *xsq = static_cast<double>(sx);
  *usq = static_cast<double>(su);
}

template <typename T>
void apply_update(T* __restrict x, const T* __restrict m, const T* __restrict v, int64_t begin, int64_t end, T eps,
                  T wd, T inv_bc1, T inv_sqrt_bc2, T step) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T xi = x[i];
    const T ui = (m[i] * inv_bc1) / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps) + wd * xi;
    x[i] = xi + step * ui;
  }
}

// The trust ratio rule of lightning_effi.optim.functional (φ(‖x‖)/‖u‖ clamped, 1 when not adapting or a norm is 0).
double trust_ratio(double xn, double un, const double* h) {
  if (h[ADAPT] == 0.0 || !(xn > 0.0) || !(un > 0.0)) return 1.0;
  const double r = std::min(std::max(xn, h[WLO]), h[WHI]) / un;
  return std::min(std::max(r, h[TLO]), h[THI]);
}

template <typename T>
double step_tensor(T* x, const T* g, T* m, T* v, int64_t n, const double* h, double count, double coef) {
  // Bias corrections from the (already advanced) step count, in double as the other paths form them.
  const bool bc = h[BIAS_CORRECTION] != 0.0;
  const double bc1 = bc ? 1.0 - std::pow(h[B1], count) : 1.0, bc2 = bc ? 1.0 - std::pow(h[B2], count) : 1.0;
  const T b1 = static_cast<T>(h[B1]), b2 = static_cast<T>(h[B2]), eps = static_cast<T>(h[EPS]);
  const T wd = static_cast<T>(h[WD]), ibc1 = static_cast<T>(1.0 / bc1), isbc2 = static_cast<T>(1.0 / std::sqrt(bc2));
  const T c = static_cast<T>(coef);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> xsq(blocks), usq(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1_) {
    for (int64_t b = b0; b < b1_; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      moments_and_sums<T>(x, g, m, v, lo, hi, c, b1, b2, eps, wd, ibc1, isbc2, &xsq[b], &usq[b]);
    }
  });
  double sx = 0.0, su = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sx += xsq[b];
    su += usq[b];
  }
  const double ratio = trust_ratio(std::sqrt(sx), std::sqrt(su), h);
  const T step = static_cast<T>(-h[LR] * ratio);
  at::parallel_for(0, n, kBlock, [&](int64_t lo, int64_t hi) {
    apply_update<T>(x, m, v, lo, hi, eps, wd, ibc1, isbc2, step);
  });
  return ratio;
}

// One LAMB step over every tensor; returns the trust ratios (float64, one per tensor). Tensors are stepped one
// after the other, so a tensor that fits the last-level cache is still there for its second pass.
torch::Tensor lamb_step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                        const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                        const std::vector<torch::Tensor>& steps, const torch::Tensor& hyper, double coef) {
  const int64_t k = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == k && static_cast<int64_t>(exp_avgs.size()) == k &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == k && static_cast<int64_t>(steps.size()) == k,
              "lamb_step: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == torch::kFloat64 && hyper.is_contiguous() &&
                  hyper.dim() == 2 && hyper.size(0) == k && hyper.size(1) == NCOL,
              "lamb_step: hyper must be a contiguous CPU float64 tensor of shape [", k, ", ", int(NCOL), "]");
  for (int64_t i = 0; i < k; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "lamb_step: tensor ", i, " must be a contiguous CPU tensor");
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == torch::kFloat32 && steps[i].numel() == 1,
                "lamb_step: the step count of tensor ", i, " must be a one-element float32 CPU tensor");
    for (const auto* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == p.scalar_type() &&
                      t->numel() == p.numel(),
                  "lamb_step: the gradient and moments of tensor ", i,
                  " must be contiguous CPU tensors of its dtype and size");
    }
  }
  auto ratios = torch::empty({k}, torch::kFloat64);
  double* r = ratios.data_ptr<double>();
  const double* h = hyper.data_ptr<double>();
  for (int64_t i = 0; i < k; ++i) {
    auto p = params[i];
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lamb_step", [&] {
      r[i] = step_tensor<scalar_t>(p.data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
                                   exp_avgs[i].data_ptr<scalar_t>(), exp_avg_sqs[i].data_ptr<scalar_t>(), p.numel(),
                                   h + NCOL * i, static_cast<double>(*steps[i].data_ptr<float>()), coef);
    });
    // Writes through raw pointers bypass the version counters that in-place ops bump (autograd's saved-tensor
    // check relies on them).
    p.unsafeGetTensorImpl()->bump_version();
    exp_avgs[i].unsafeGetTensorImpl()->bump_version();
    exp_avg_sqs[i].unsafeGetTensorImpl()->bump_version();
  }
  return ratios;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lamb_step", &lamb_step, "LAMB step for unsharded contiguous float32/float64 CPU tensors");
  m.attr("NCOL") = static_cast<int>(NCOL);
}
