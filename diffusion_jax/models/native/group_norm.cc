// GroupNorm (Wu & He 2018, eq. 1 with the sets of eq. 7) of x [B,S,C] float32 (S: the spatial positions, NHWC
// flattened) with a per-channel scale and bias, then SiLU when asked, forward and backward, as XLA FFI custom calls
// (diffusion_jax/models/native/__init__.py builds and registers them; layers.group_norm_affine calls them):
//   GroupNorm:      y = act(x * mul[c] + add[c]),  mul = rstd[g] * scale[c],  add = bias[c] - mean[g] * mul,
//                   mean / rstd per example and group over S x C/G elements; act = SiLU (y * sigmoid(y)) or none.
//   GroupNormGrad:  dx = p[c] dy' + q[c] x + r[c] (dy': dy through SiLU's derivative), with the per-example sums
//                   sum_s dy'[c] and sum_s dy' xhat[c] returned for the scale's and bias's gradients.
// The formulas are layers._group_norm_bwd's (its docstring derives them). Why: XLA:CPU runs a GroupNorm as 4-8
// fusions, each a pass over the whole activation (the statistics' column reductions, the normalisation, SiLU's
// derivative, the two backward reductions and dx), so activations of a few MB went through main memory every pass:
// fmnist_small's bfloat16 train step spent ~24% of its op time in elementwise and reduce fusions, most of them the
// normalisations'. Here one task holds one example (or a range of its groups) and makes both of its passes over it
// back to back, the second from L2. epsilon and SiLU arrive as a small operand, not as attributes: under a mesh
// the call is custom_partitioning's, whose HLO (the compilation cache's key, native.keep_compilation_cache_hits)
// holds its operands but not the Python arguments that would have become attributes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using diffusion_jax::ParallelFor;

namespace {

// e^x on 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r from Cephes' expf polynomial (S. Moshier; ~1 ulp),
// times 2^n by scalef. x clamped to float32's range first.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for an exact first product
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + e^-y): the reciprocal from rcp14's 14 bits and one Newton step (~1 ulp; a division's throughput on
// 512-bit vectors is a fraction of this).
inline __m512 Sigmoid(__m512 y) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), Exp(_mm512_sub_ps(_mm512_setzero_ps(), y)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// dy through SiLU at y: dy * s * (1 + y * (1 - s)), s = sigmoid(y).
inline __m512 SiluGrad(__m512 y, __m512 dy) {
  const __m512 s = Sigmoid(y), one = _mm512_set1_ps(1.0f);
  return _mm512_mul_ps(_mm512_mul_ps(dy, s), _mm512_fmadd_ps(y, _mm512_sub_ps(one, s), one));
}

struct GnShape { int B, S, C, G; };

// The channels [c0, c0 + n) one task holds, as 16-lane vectors (the last one masked).
struct Lanes {
  int c0, n, vectors;
  __mmask16 Mask(int v) const {
    const int left = n - v * 16;
    return static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
  }
};

// Rows summed in float32 before they are added to the float64 totals: long spatial sums (64x64 and up) keep
// float32's rounding of a few hundred terms, not of S.
constexpr int kRowsPerPartial = 256;

// Per-channel sums over the S rows of one example, of f(row pointer, v) (one or two vectors per lane group), into
// float64 totals [n] each. f returns the two vectors to add.
template <typename F>
void ChannelSums(const Lanes& lanes, int S, double* first, double* second, F f) {
  std::fill(first, first + lanes.n, 0.0);
  std::fill(second, second + lanes.n, 0.0);
  alignas(64) float a[16], b[16];
  for (int s0 = 0; s0 < S; s0 += kRowsPerPartial) {
    const int s1 = std::min(S, s0 + kRowsPerPartial);
    for (int v = 0; v < lanes.vectors; ++v) {
      const __mmask16 m = lanes.Mask(v);
      // four independent pairs of accumulators: one add chain would wait on its own latency every row
      __m512 acc_a[4], acc_b[4];
      for (int k = 0; k < 4; ++k) acc_a[k] = acc_b[k] = _mm512_setzero_ps();
      int s = s0;
      for (; s + 4 <= s1; s += 4) {
        for (int k = 0; k < 4; ++k) {
          __m512 u, w;
          f(s + k, v, m, &u, &w);
          acc_a[k] = _mm512_add_ps(acc_a[k], u);
          acc_b[k] = _mm512_add_ps(acc_b[k], w);
        }
      }
      for (; s < s1; ++s) {
        __m512 u, w;
        f(s, v, m, &u, &w);
        acc_a[0] = _mm512_add_ps(acc_a[0], u);
        acc_b[0] = _mm512_add_ps(acc_b[0], w);
      }
      _mm512_store_ps(a, _mm512_add_ps(_mm512_add_ps(acc_a[0], acc_a[1]), _mm512_add_ps(acc_a[2], acc_a[3])));
      _mm512_store_ps(b, _mm512_add_ps(_mm512_add_ps(acc_b[0], acc_b[1]), _mm512_add_ps(acc_b[2], acc_b[3])));
      for (int i = 0; i < 16 && v * 16 + i < lanes.n; ++i) {
        first[v * 16 + i] += a[i];
        second[v * 16 + i] += b[i];
      }
    }
  }
}

// mul[c] = rstd * scale[c], add[c] = bias[c] - mean * mul[c] for the task's channels (the forward's and the
// backward's normalisation from the same float32 statistics).
void Affine(const Lanes& lanes, int Cg, const float* mean, const float* rstd, const float* scale, const float* bias,
            float* mul, float* add) {
  for (int i = 0; i < lanes.n; ++i) {
    const int c = lanes.c0 + i, g = c / Cg;
    mul[i] = rstd[g] * scale[c];
    add[i] = bias[c] - mean[g] * mul[i];
  }
}

// Tasks: each example, split into `splits` ranges of whole groups while there are fewer than 2 tasks per thread of
// XLA's pool and each range keeps >= 16 channels (sampling at batch 1-2 would otherwise run on one core).
int SplitsFor(ffi::ThreadPool& pool, const GnShape& s) {
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  int splits = 1;
  while (s.B * splits < 2 * threads && s.G % (2 * splits) == 0 && s.C / (2 * splits) >= 16) splits *= 2;
  return splits;
}

Lanes LanesOf(const GnShape& s, int splits, int part) {
  const int n = s.C / splits;
  return Lanes{part * n, n, (n + 15) / 16};
}

// x [B,S,C], scale / bias [C], and the [B,G] statistics' shapes; an empty string when they fit.
template <typename Dims>
const char* CheckShapes(const Dims& xd, const Dims& sd, const Dims& bd, const Dims& md, int64_t groups) {
  if (xd.size() != 3 || sd.size() != 1 || bd.size() != 1 || md.size() != 2) return "ranks";
  if (groups <= 0 || xd[2] % groups != 0) return "groups";
  if (sd[0] != xd[2] || bd[0] != xd[2] || md[0] != xd[0] || md[1] != groups) return "shapes";
  return "";
}

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace

static ffi::Error GroupNormImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> options,
                                ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean_out,
                                ffi::ResultBuffer<ffi::F32> rstd_out, int64_t groups) {
  const auto xd = x.dimensions();
  if (*CheckShapes(xd, scale.dimensions(), bias.dimensions(), mean_out->dimensions(), groups) ||
      options.element_count() != 2)
    return ffi::Error::InvalidArgument("group_norm: expected x [B,S,C], scale and bias [C], options [epsilon, silu], "
                                       "mean and rstd [B,G] with G dividing C");
  const float epsilon = options.typed_data()[0];
  const bool silu = options.typed_data()[1] != 0.0f;
  const GnShape s{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(xd[2]),
                  static_cast<int>(groups)};
  const int Cg = s.C / s.G, splits = SplitsFor(pool, s);
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data();
  float *ys = y->typed_data(), *means = mean_out->typed_data(), *rstds = rstd_out->typed_data();
  ParallelFor(pool, s.B * splits, [=](int task) {
    const int b = task / splits;
    const Lanes lanes = LanesOf(s, splits, task % splits);
    const float* xb = xs + static_cast<size_t>(b) * s.S * s.C + lanes.c0;
    float* yb = ys + static_cast<size_t>(b) * s.S * s.C + lanes.c0;
    std::vector<double> sum(lanes.n), sum_sq(lanes.n);
    ChannelSums(lanes, s.S, sum.data(), sum_sq.data(), [=](int row, int v, __mmask16 m, __m512* u, __m512* w) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xb + static_cast<size_t>(row) * s.C + v * 16);
      *u = xv;
      *w = _mm512_mul_ps(xv, xv);
    });
    // statistics of the task's groups: var = E[x^2] - E[x]^2 (float64 here), as layers._group_stats
    const double count = static_cast<double>(s.S) * Cg;
    for (int g = lanes.c0 / Cg; g < (lanes.c0 + lanes.n) / Cg; ++g) {
      double total = 0, total_sq = 0;
      for (int c = g * Cg; c < (g + 1) * Cg; ++c) {
        total += sum[c - lanes.c0];
        total_sq += sum_sq[c - lanes.c0];
      }
      const double mu = total / count, var = std::max(total_sq / count - mu * mu, 0.0);
      means[b * s.G + g] = static_cast<float>(mu);
      rstds[b * s.G + g] = static_cast<float>(1.0 / std::sqrt(var + epsilon));
    }
    std::vector<float> mul(lanes.vectors * 16, 0.0f), add(lanes.vectors * 16, 0.0f);
    Affine(lanes, Cg, means + b * s.G, rstds + b * s.G, sc, bi, mul.data(), add.data());
    for (int row = 0; row < s.S; ++row) {
      const float* xr = xb + static_cast<size_t>(row) * s.C;
      float* yr = yb + static_cast<size_t>(row) * s.C;
      for (int v = 0; v < lanes.vectors; ++v) {
        const __mmask16 m = lanes.Mask(v);
        __m512 h = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr + v * 16), _mm512_loadu_ps(&mul[v * 16]),
                                   _mm512_loadu_ps(&add[v * 16]));
        if (silu) h = _mm512_mul_ps(h, Sigmoid(h));
        _mm512_mask_storeu_ps(yr + v * 16, m, h);
      }
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupNorm, GroupNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B,S,C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // options [epsilon, silu (0 or 1)]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [B,S,C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean [B,G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [B,G]
                                  .Attr<int64_t>("groups"));

static ffi::Error GroupNormGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> options,
                                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> sum_dy_out,
                                    ffi::ResultBuffer<ffi::F32> sum_dy_xhat_out, int64_t groups) {
  const auto xd = x.dimensions();
  if (*CheckShapes(xd, scale.dimensions(), bias.dimensions(), mean.dimensions(), groups) ||
      !SameDims(rstd.dimensions(), mean.dimensions()) || !SameDims(dy.dimensions(), xd) ||
      options.element_count() != 2)
    return ffi::Error::InvalidArgument("group_norm_grad: expected x and dy [B,S,C], scale and bias [C], mean and "
                                       "rstd [B,G] with G dividing C, options [epsilon, silu]");
  const bool silu = options.typed_data()[1] != 0.0f;
  const GnShape s{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(xd[2]),
                  static_cast<int>(groups)};
  const int Cg = s.C / s.G, splits = SplitsFor(pool, s);
  const float *xs = x.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data();
  const float *means = mean.typed_data(), *rstds = rstd.typed_data(), *dys = dy.typed_data();
  float *dxs = dx->typed_data(), *sum_dys = sum_dy_out->typed_data(), *sum_xhats = sum_dy_xhat_out->typed_data();
  ParallelFor(pool, s.B * splits, [=](int task) {
    const int b = task / splits;
    const Lanes lanes = LanesOf(s, splits, task % splits);
    const size_t offset = static_cast<size_t>(b) * s.S * s.C + lanes.c0;
    const float *xb = xs + offset, *dyb = dys + offset;
    float* dxb = dxs + offset;
    const float *mu = means + b * s.G, *rs = rstds + b * s.G;
    std::vector<float> mul(lanes.vectors * 16, 0.0f), add(lanes.vectors * 16, 0.0f);
    Affine(lanes, Cg, mu, rs, sc, bi, mul.data(), add.data());
    // dy' at (row, v): dy, through SiLU's derivative at the recomputed output when silu
    const auto grad_at = [=, &mul, &add](int row, int v, __mmask16 m, __m512* xv) {
      const size_t at = static_cast<size_t>(row) * s.C + v * 16;
      *xv = _mm512_maskz_loadu_ps(m, xb + at);
      const __m512 d = _mm512_maskz_loadu_ps(m, dyb + at);
      if (!silu) return d;
      return SiluGrad(_mm512_fmadd_ps(*xv, _mm512_loadu_ps(&mul[v * 16]), _mm512_loadu_ps(&add[v * 16])), d);
    };
    // Under SiLU the first pass also keeps dy' in dx's rows (rewritten by the second pass, in L2 by then), so the
    // sigmoid is computed once per element, not twice.
    std::vector<double> sum_dy(lanes.n), sum_dy_x(lanes.n);
    ChannelSums(lanes, s.S, sum_dy.data(), sum_dy_x.data(), [&](int row, int v, __mmask16 m, __m512* u, __m512* w) {
      __m512 xv;
      *u = grad_at(row, v, m, &xv);
      *w = _mm512_mul_ps(*u, xv);
      if (silu) _mm512_mask_storeu_ps(dxb + static_cast<size_t>(row) * s.C + v * 16, m, *u);
    });
    // [n] coefficients (layers._group_norm_bwd): m1 = mean_group(dy' scale), m2 = mean_group(dy' xhat scale)
    const double count = static_cast<double>(s.S) * Cg;
    std::vector<float> p(lanes.vectors * 16, 0.0f), q(lanes.vectors * 16, 0.0f), r(lanes.vectors * 16, 0.0f);
    for (int g = lanes.c0 / Cg; g < (lanes.c0 + lanes.n) / Cg; ++g) {
      double m1 = 0, m2 = 0;
      for (int c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int i = c - lanes.c0;
        const double xhat_sum = (sum_dy_x[i] - mu[g] * sum_dy[i]) * rs[g];
        sum_dys[static_cast<size_t>(b) * s.C + c] = static_cast<float>(sum_dy[i]);
        sum_xhats[static_cast<size_t>(b) * s.C + c] = static_cast<float>(xhat_sum);
        m1 += sum_dy[i] * sc[c];
        m2 += xhat_sum * sc[c];
      }
      m1 /= count;
      m2 /= count;
      const double rstd_g = rs[g];
      for (int c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int i = c - lanes.c0;
        p[i] = static_cast<float>(rstd_g * sc[c]);
        q[i] = static_cast<float>(-rstd_g * rstd_g * m2);
        r[i] = static_cast<float>(rstd_g * (rstd_g * m2 * mu[g] - m1));
      }
    }
    for (int row = 0; row < s.S; ++row) {
      for (int v = 0; v < lanes.vectors; ++v) {
        const __mmask16 m = lanes.Mask(v);
        const size_t at = static_cast<size_t>(row) * s.C + v * 16;
        const __m512 xv = _mm512_maskz_loadu_ps(m, xb + at);
        const __m512 d = _mm512_maskz_loadu_ps(m, (silu ? dxb : dyb) + at);
        const __m512 out = _mm512_fmadd_ps(d, _mm512_loadu_ps(&p[v * 16]),
                                           _mm512_fmadd_ps(xv, _mm512_loadu_ps(&q[v * 16]),
                                                           _mm512_loadu_ps(&r[v * 16])));
        _mm512_mask_storeu_ps(dxb + at, m, out);
      }
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupNormGrad, GroupNormGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B,S,C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [B,G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd [B,G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [B,S,C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // options [epsilon, silu (0 or 1)]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [B,S,C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum over S of dy' [B,C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum over S of dy' xhat [B,C]
                                  .Attr<int64_t>("groups"));
