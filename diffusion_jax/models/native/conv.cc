// Stride-1 KxK convolutions (K = 2 or 3) padded by P on each side, NHWC / HWIO, float32, for x86-64 CPUs with
// AVX-512, as XLA FFI custom calls (diffusion_jax/models/native/__init__.py builds and registers them). x [B,H,W,Ci],
// w [K,K,Ci,Co], y / dy [B,Ho,Wo,Co] with Ho = H + 2P - K + 1 (Wo likewise); x is zero outside its extent:
//   Conv:            y[b,oh,ow,co]   = sum_{kh,kw,ci} x[b, oh+kh-P, ow+kw-P, ci] * w[kh,kw,ci,co]
//   ConvFilterGrad:  dw[kh,kw,ci,co] = sum_{b,oh,ow}  x[b, oh+kh-P, ow+kw-P, ci] * dy[b,oh,ow,co]
// (the input gradient is Conv of dy with the flipped, transposed kernel). The U-Nets' 3x3 'same' convs are K=3,
// P=1; layers.upsample_conv's sub-pixel conv is K=2, P=1.
// Why: XLA:CPU's (Eigen's) filter gradient of the narrow convs of small U-Nets ran at 40-100 GFLOP/s per core,
// about 60% of its forward's rate, because its GEMM contracts over B*H*W into a small [9 Ci, Co] result. Here each
// block of input channels x output channels keeps its [CB, NB*16] slice of dw in registers (CB*NB <= 24 of the 32
// zmm registers) and streams the pixels through it: per pixel NB loads of dy, CB broadcasts of x, CB*NB FMAs. x's
// rows are packed per channel block with zero borders, so the taps need no edge tests. The conv keeps a block of
// output pixels x output channels in registers the same way (below).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One block of CB input channels x NB*16 output channels, all K*K taps, over `rows` output rows of one image.
// xs: the x rows they read, of the block's channels, packed [rows+K-1, Wo+K-1, CB] with zero borders.
// dy: the first of those output rows. The accumulators are loaded from and stored to dw once per tap and chunk.
template <int K, int NB, int CB>
void Taps(const float* xs, const float* dy, float* dw, int Wo, int Ci, int Co, int c0, int cvalid, int o0,
          int rows) {
  const int ws = Wo + K - 1;
  for (int kh = 0; kh < K; ++kh) {
    for (int kw = 0; kw < K; ++kw) {
      float* out = dw + (static_cast<size_t>(kh * K + kw) * Ci + c0) * Co + o0;
      // acc[i][j] stays in registers only if every index is known at compile time: a partial block goes through
      // a full-size staging copy instead of a loop bounded by cvalid.
      alignas(64) float stage[CB * NB * 16];
      const float* src = out;
      int src_stride = Co;
      if (cvalid < CB) {
        std::memset(stage, 0, sizeof(stage));
        for (int i = 0; i < cvalid; ++i) std::memcpy(stage + i * NB * 16, out + i * Co, sizeof(float) * NB * 16);
        src = stage;
        src_stride = NB * 16;
      }
      __m512 acc[CB][NB];
      for (int i = 0; i < CB; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_loadu_ps(src + i * src_stride + j * 16);
      for (int r = 0; r < rows; ++r) {
        const float* dyr = dy + static_cast<size_t>(r) * Wo * Co + o0;
        const float* xr = xs + (static_cast<size_t>(r + kh) * ws + kw) * CB;
        for (int w = 0; w < Wo; ++w) {
          __m512 d[NB];
          for (int j = 0; j < NB; ++j) d[j] = _mm512_loadu_ps(dyr + static_cast<size_t>(w) * Co + j * 16);
          const float* xp = xr + w * CB;
          for (int i = 0; i < CB; ++i) {
            const __m512 xv = _mm512_set1_ps(xp[i]);
            for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, d[j], acc[i][j]);
          }
        }
      }
      float* dst = cvalid < CB ? stage : out;
      const int dst_stride = cvalid < CB ? NB * 16 : Co;
      for (int i = 0; i < CB; ++i)
        for (int j = 0; j < NB; ++j) _mm512_storeu_ps(dst + i * dst_stride + j * 16, acc[i][j]);
      if (cvalid < CB)
        for (int i = 0; i < cvalid; ++i) std::memcpy(out + i * Co, stage + i * NB * 16, sizeof(float) * NB * 16);
    }
  }
}

struct Shape { int B, H, W, Ho, Wo, Ci, Co, P; };

// Blocks [blk0, blk1) of input channels (CB each), every output channel, every image.
template <int K, int NB, int CB>
void Range(const float* x, const float* dy, float* dw, Shape s, int blk0, int blk1) {
  const int ws = s.Wo + K - 1;
  const int rows_per_chunk = std::max(1, std::min(s.Ho, 256 / s.Wo));  // ~256 pixels of dy: in L1 / L2
  std::vector<float> xs(static_cast<size_t>(rows_per_chunk + K - 1) * ws * CB);
  for (int blk = blk0; blk < blk1; ++blk) {  // zero this block's rows of dw first
    const int c0 = blk * CB, cvalid = std::min(CB, s.Ci - c0);
    for (int t = 0; t < K * K; ++t)
      std::memset(dw + (static_cast<size_t>(t) * s.Ci + c0) * s.Co, 0, sizeof(float) * cvalid * s.Co);
  }
  for (int b = 0; b < s.B; ++b) {
    for (int h0 = 0; h0 < s.Ho; h0 += rows_per_chunk) {
      const int rows = std::min(rows_per_chunk, s.Ho - h0);
      const float* dyc = dy + (static_cast<size_t>(b) * s.Ho + h0) * s.Wo * s.Co;
      for (int blk = blk0; blk < blk1; ++blk) {
        const int c0 = blk * CB, cvalid = std::min(CB, s.Ci - c0);
        // x's rows h0-P .. h0+rows+K-2-P, columns -P .. Wo+K-2-P, of channels [c0, c0+cvalid); zero outside x
        std::fill(xs.begin(), xs.end(), 0.0f);
        for (int r = 0; r < rows + K - 1; ++r) {
          const int h = h0 - s.P + r;
          if (h < 0 || h >= s.H) continue;
          const float* src = x + ((static_cast<size_t>(b) * s.H + h) * s.W) * s.Ci + c0;
          float* dst = xs.data() + static_cast<size_t>(r) * ws * CB;
          for (int j = 0; j < ws; ++j) {
            const int w = j - s.P;
            if (w >= 0 && w < s.W)
              std::memcpy(dst + j * CB, src + static_cast<size_t>(w) * s.Ci, sizeof(float) * cvalid);
          }
        }
        for (int o0 = 0; o0 < s.Co; o0 += NB * 16)
          Taps<K, NB, CB>(xs.data(), dyc, dw, s.Wo, s.Ci, s.Co, c0, cvalid, o0, rows);
      }
    }
  }
}

using RangeFn = void (*)(const float*, const float*, float*, Shape, int, int);

// The widest output block that divides Co (Co % 16 == 0), and the input-channel block that fills 24 registers.
template <int K>
void PickFor(int Co, RangeFn* fn, int* cb) {
  if (Co % 64 == 0) { *fn = Range<K, 4, 6>; *cb = 6; }
  else if (Co % 48 == 0) { *fn = Range<K, 3, 8>; *cb = 8; }
  else if (Co % 32 == 0) { *fn = Range<K, 2, 12>; *cb = 12; }
  else { *fn = Range<K, 1, 24>; *cb = 24; }
}

void Pick(int K, int Co, RangeFn* fn, int* cb) {
  if (K == 2) PickFor<2>(Co, fn, cb);
  else PickFor<3>(Co, fn, cb);
}

// ---------------------------------------------------------------- the convolution itself
// out[b,oh,ow,co] = sum_{kh,kw,ci} x[b, oh+kh-P, ow+kw-P, ci] * w[kh,kw,ci,co], Ho = H + 2P - K + 1 (Wo likewise).
// A direct convolution: PB consecutive output pixels of one row x NB*16 output channels in registers (PB*NB = 24);
// per (tap, ci) NB loads of w, PB broadcasts of x, PB*NB FMAs. A row's last Wo % PB pixels go in blocks of 8, 4, 2
// and 1 (a whole block there would compute up to 3x the pixels at 7x7). xp: the input rows of Ho output rows of one
// image, zero-padded, [Ho+K-1, Wo+K-1, Ci]; out: those output rows.
template <int K, int NB, int PB>
void ForwardBlock(const float* xp, int Wp, const float* w, float* out, int Wo, int Ci, int Co, int oh, int w0,
                  int o0) {
  __m512 acc[PB][NB];
  for (int p = 0; p < PB; ++p)
    for (int j = 0; j < NB; ++j) acc[p][j] = _mm512_setzero_ps();
  for (int kh = 0; kh < K; ++kh) {
    for (int kw = 0; kw < K; ++kw) {
      const float* xr = xp + (static_cast<size_t>(oh + kh) * Wp + w0 + kw) * Ci;
      const float* wr = w + static_cast<size_t>(kh * K + kw) * Ci * Co + o0;
      for (int ci = 0; ci < Ci; ++ci) {
        __m512 wv[NB];
        for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(wr + static_cast<size_t>(ci) * Co + j * 16);
        for (int p = 0; p < PB; ++p) {
          const __m512 xv = _mm512_set1_ps(xr[static_cast<size_t>(p) * Ci + ci]);
          for (int j = 0; j < NB; ++j) acc[p][j] = _mm512_fmadd_ps(xv, wv[j], acc[p][j]);
        }
      }
    }
  }
  float* dst = out + (static_cast<size_t>(oh) * Wo + w0) * Co + o0;
  for (int p = 0; p < PB; ++p)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(dst + static_cast<size_t>(p) * Co + j * 16, acc[p][j]);
}

template <int K, int NB, int PB>
void ForwardImage(const float* xp, int Wp, const float* w, float* out, int Ho, int Wo, int Ci, int Co) {
  for (int oh = 0; oh < Ho; ++oh) {
    for (int o0 = 0; o0 < Co; o0 += NB * 16) {
      int w0 = 0;
      for (; w0 + PB <= Wo; w0 += PB) ForwardBlock<K, NB, PB>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
      if (PB > 8) for (; w0 + 8 <= Wo; w0 += 8) ForwardBlock<K, NB, 8>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
      for (; w0 + 4 <= Wo; w0 += 4) ForwardBlock<K, NB, 4>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
      for (; w0 + 2 <= Wo; w0 += 2) ForwardBlock<K, NB, 2>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
      for (; w0 < Wo; ++w0) ForwardBlock<K, NB, 1>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
    }
  }
}

using ForwardFn = void (*)(const float*, int, const float*, float*, int, int, int, int);

template <int K>
ForwardFn PickForwardFor(int Co) {
  if (Co % 64 == 0) return ForwardImage<K, 4, 6>;
  if (Co % 48 == 0) return ForwardImage<K, 3, 8>;
  if (Co % 32 == 0) return ForwardImage<K, 2, 12>;
  return ForwardImage<K, 1, 24>;
}


// fn(0) .. fn(tasks - 1) shared out over XLA's intra-op pool. The calling thread works too and takes every task no
// helper has started, so the call finishes even when the pool's threads are all busy (each host device's program
// runs on one of them); it then waits only for tasks a started helper holds. The state is shared with helpers
// that start after the call returned (they find no task left).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int tasks, Fn fn) {
  struct State {
    Fn fn; int tasks;
    std::atomic<int> next{0};
    int done = 0;
    std::mutex mu;
    std::condition_variable cv;
    State(Fn f, int n) : fn(std::move(f)), tasks(n) {}
    void Run() {
      for (int t; (t = next.fetch_add(1)) < tasks;) {
        fn(t);
        std::lock_guard<std::mutex> lock(mu);
        if (++done == tasks) cv.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn), tasks);
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), tasks)) - 1;
  for (int i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->tasks; });
}

// Whether x [B,H,W,Ci], a kernel [K,K,Ci,Co] and an output [B,Ho,Wo,Co] are a stride-1 KxK conv padded by P on
// each side (Ho = H + 2P - K + 1) that the kernels here take: K 2 or 3, 0 <= P < K, Co a multiple of 16.
template <typename Dims>
bool ConvShapesFit(const Dims& xd, const Dims& kd, const Dims& yd, int64_t padding) {
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) return false;
  const int64_t k = kd[0];
  return (k == 2 || k == 3) && kd[1] == k && 0 <= padding && padding < k && xd[0] == yd[0] &&
         yd[1] == xd[1] + 2 * padding - k + 1 && yd[2] == xd[2] + 2 * padding - k + 1 && kd[2] == xd[3] &&
         kd[3] == yd[3] && yd[3] % 16 == 0 && yd[1] > 0 && yd[2] > 0;
}

// Both handlers' signature: XLA's intra-op pool, two float32 arrays in, one out, the padding as an attribute.
auto TwoArraysAndPadding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("padding");
}

}  // namespace

static ffi::Error ConvFilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                     ffi::ResultBuffer<ffi::F32> dw, int64_t padding) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (!ConvShapesFit(xd, wd, yd, padding))
    return ffi::Error::InvalidArgument("conv_filter_grad: expected x [B,H,W,Cin], dy [B,H+2P-K+1,W+2P-K+1,Cout] "
                                       "with Cout a multiple of 16, dw [K,K,Cin,Cout], K 2 or 3, 0 <= P < K");
  const Shape s{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(xd[2]), static_cast<int>(yd[1]),
                static_cast<int>(yd[2]), static_cast<int>(xd[3]), static_cast<int>(yd[3]), static_cast<int>(padding)};
  RangeFn fn;
  int cb;
  Pick(static_cast<int>(wd[0]), s.Co, &fn, &cb);
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dwp = dw->typed_data();
  ParallelFor(pool, (s.Ci + cb - 1) / cb, [=](int blk) { fn(xp, dyp, dwp, s, blk, blk + 1); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFilterGrad, ConvFilterGradImpl, TwoArraysAndPadding());

static ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t padding) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!ConvShapesFit(xd, wd, yd, padding))
    return ffi::Error::InvalidArgument("conv: expected x [B,H,W,Cin], w [K,K,Cin,Cout] with Cout a multiple of 16, "
                                       "y [B,H+2P-K+1,W+2P-K+1,Cout], K 2 or 3, 0 <= P < K");
  const int B = static_cast<int>(xd[0]), H = static_cast<int>(xd[1]), W = static_cast<int>(xd[2]);
  const int Ci = static_cast<int>(xd[3]), Co = static_cast<int>(yd[3]), P = static_cast<int>(padding);
  const int Ho = static_cast<int>(yd[1]), Wo = static_cast<int>(yd[2]), K = static_cast<int>(wd[0]);
  const ForwardFn fn = K == 2 ? PickForwardFor<2>(Co) : PickForwardFor<3>(Co);
  const int Wp = Wo + K - 1;
  // Tasks: bands of each image's output rows, enough for every thread of the pool (2 per thread) even when a
  // device holds 1-2 images (sampling, evaluation); one band per image at larger batches.
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  const int bands = std::min(Ho, std::max(1, (2 * threads + B - 1) / B));
  const int band_rows = (Ho + bands - 1) / bands;
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, B * bands, [=](int task) {
    const int b = task / bands, oh0 = (task % bands) * band_rows, rows = std::min(band_rows, Ho - oh0);
    if (rows <= 0) return;
    // the band's input rows, zero-padded: padded row r is x's row oh0 + r - P
    std::vector<float> xp(static_cast<size_t>(rows + K - 1) * Wp * Ci, 0.0f);
    for (int r = 0; r < rows + K - 1; ++r) {
      const int h = oh0 + r - P;
      if (h >= 0 && h < H)
        std::memcpy(xp.data() + (static_cast<size_t>(r) * Wp + P) * Ci,
                    xs + (static_cast<size_t>(b) * H + h) * W * Ci, sizeof(float) * W * Ci);
    }
    fn(xp.data(), Wp, ws, ys + (static_cast<size_t>(b) * Ho + oh0) * Wo * Co, rows, Wo, Ci, Co);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv, ConvImpl, TwoArraysAndPadding());
