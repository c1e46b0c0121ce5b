// Stride-1 KxK convolutions (K = 2 or 3) padded by P on each side, NHWC / HWIO, float32, for x86-64 CPUs with
// AVX-512, as XLA FFI custom calls (diffusion_jax/models/native/__init__.py builds and registers them). x [B,H,W,Ci],
// w [K,K,Ci,Co], y / dy [B,Ho,Wo,Co] with Ho = H + 2P - K + 1 (Wo likewise); x is zero outside its extent:
//   Conv:            y[b,oh,ow,co]   = sum_{kh,kw,ci} x[b, oh+kh-P, ow+kw-P, ci] * w[kh,kw,ci,co]
//   ConvFilterGrad:  dw[kh,kw,ci,co] = sum_{b,oh,ow}  x[b, oh+kh-P, ow+kw-P, ci] * dy[b,oh,ow,co]
// (the input gradient is Conv of dy with the flipped, transposed kernel). The U-Nets' 3x3 'same' convs are K=3,
// P=1; layers.upsample_conv's sub-pixel conv is K=2, P=1.
// bfloat16 (x, w / dy bfloat16; float32 sums and result): on AMX's tiles where the CPU has them, else with
// AVX512-BF16's dot products (ConvBf16, ConvFilterGradBf16; below).
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
#include <type_traits>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using diffusion_jax::ParallelFor;

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

struct Shape { int B, H, W, Ho, Wo, Ci, Co, P, K; };

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

// A row of Wo output pixels in blocks of PB, the rest in blocks of 8, 4, 2 and 1: block(pixels, w0) with pixels a
// std::integral_constant (the forward kernels' register block is a template argument).
template <int PB, typename Block>
inline void AlongRow(int Wo, Block&& block) {
  int w0 = 0;
  for (; w0 + PB <= Wo; w0 += PB) block(std::integral_constant<int, PB>(), w0);
  if constexpr (PB > 8) for (; w0 + 8 <= Wo; w0 += 8) block(std::integral_constant<int, 8>(), w0);
  for (; w0 + 4 <= Wo; w0 += 4) block(std::integral_constant<int, 4>(), w0);
  for (; w0 + 2 <= Wo; w0 += 2) block(std::integral_constant<int, 2>(), w0);
  for (; w0 < Wo; ++w0) block(std::integral_constant<int, 1>(), w0);
}

template <int K, int NB, int PB>
void ForwardImage(const float* xp, int Wp, const float* w, float* out, int Ho, int Wo, int Ci, int Co) {
  for (int oh = 0; oh < Ho; ++oh)
    for (int o0 = 0; o0 < Co; o0 += NB * 16)
      AlongRow<PB>(Wo, [&](auto pixels, int w0) {
        ForwardBlock<K, NB, decltype(pixels)::value>(xp, Wp, w, out, Wo, Ci, Co, oh, w0, o0);
      });
}

using ForwardFn = void (*)(const float*, int, const float*, float*, int, int, int, int);

// The forward kernels' register block for Co output channels (float32's and AVX512-BF16's alike): the widest NB
// vectors of 16 output channels that divide Co, and PB = 24 / NB pixels. make(nb, pb) with both as
// std::integral_constant returns the kernel instantiated for them.
template <typename Make>
auto ForwardRegisterBlock(int Co, Make make) {
  using std::integral_constant;
  if (Co % 64 == 0) return make(integral_constant<int, 4>(), integral_constant<int, 6>());
  if (Co % 48 == 0) return make(integral_constant<int, 3>(), integral_constant<int, 8>());
  if (Co % 32 == 0) return make(integral_constant<int, 2>(), integral_constant<int, 12>());
  return make(integral_constant<int, 1>(), integral_constant<int, 24>());
}

template <int K>
ForwardFn PickForwardFor(int Co) {
  return ForwardRegisterBlock(Co, [](auto nb, auto pb) -> ForwardFn {
    return ForwardImage<K, decltype(nb)::value, decltype(pb)::value>;
  });
}


// ---------------------------------------------------------------- bfloat16 on AMX (Intel Sapphire Rapids and later)
// The same convolution and filter gradient for bfloat16 x, w / dy, with float32 sums and a float32 result, on the
// AMX tile unit: one tdpbf16ps multiplies a [16, 32] bfloat16 tile by a [32, 16] one into a [16, 16] float32 tile
// (8192 multiply-adds; AVX-512's FMA does 16). Why: XLA:CPU ran fmnist_small's bfloat16 convs at ~70 GFLOP/s on 2
// cores (its float32 ones: ~100) while its bfloat16 matmuls reach ~785. Compiled for AMX whatever -march says
// (target attributes), and called only where the CPU has it (`EnableAmx`, then __init__.py's checks).
// Tiles: C[mb][nb] = tiles mb + 2 nb (the float32 sums), A = tiles 4, 5, B = tiles 6, 7; all 16 rows x 64 bytes.
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile state is per thread and other code (XLA's oneDNN matmuls) configures it too: every task loads its own.
AMX_TARGET void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) { config.colsb[t] = 64; config.rows[t] = 16; }
  _tile_loadconfig(&config);
}

// AVX-512 index vectors the packings share. PairInterleave(first): for permutex2var, lanes 2j and 2j+1 take element
// first + j of the first row and of the second (index 32 + ...): two rows' 16 elements as 16 pairs, AMX's B layout.
// LaneStrides(stride): lane j is j * stride, the offsets of a 16-lane gather down a column.
__attribute__((target("avx512f,avx512bw")))
__m512i PairInterleave(int first) {
  alignas(64) uint16_t index[32];
  for (int j = 0; j < 16; ++j) {
    index[2 * j] = static_cast<uint16_t>(first + j);
    index[2 * j + 1] = static_cast<uint16_t>(32 + first + j);
  }
  return _mm512_load_si512(index);
}

__attribute__((target("avx512f")))
__m512i LaneStrides(int stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(stride));
}

// [K*K, ceil(Ci/32), Co/16] tiles of 16 pairs of input channels x 16 output channels x 2 (AMX's B layout, "VNNI":
// element (k, n) of a [32, 16] block at [k/2][n][k%2]), zero past Ci. w: [K,K,Ci,Co] bfloat16 bits; `flipped`: w
// is [K,K,Co,Ci] and tap t is w's tap K*K-1-t transposed (the input gradient's kernel from the forward one, with no
// copy of it made first). PackKernelChunk packs one tap's one chunk of 32 input channels into packed (zeroed):
// per pair of channels and 16 output channels one 64-byte store, made by a permute of two 32-byte loads, or by one
// gather of 16 channel pairs when flipped. Why: packed element by element the kernel took ~2.8 ms of a bfloat16
// conv with a [3,3,512,256] kernel on one thread (XLA's flip + transpose of it: 1.4 ms), per call, forward and
// input gradient, before any product.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void PackKernelChunk(const uint16_t* w, int taps, int Ci, int Co, bool flipped, int t, int c, uint16_t* packed) {
  const int chunks = (Ci + 31) / 32, oblocks = Co / 16;
  const __m512i interleave_idx = PairInterleave(0);
  const __m512i rows = LaneStrides(Ci);  // flipped: 16 output channels' rows of w
  const int source_tap = flipped ? taps - 1 - t : t;
  for (int kp = 0; kp < 16; ++kp) {
    const int ci = c * 32 + 2 * kp;
    if (ci >= Ci) break;
    const bool pair = ci + 1 < Ci;
    for (int ob = 0; ob < oblocks; ++ob) {
      uint16_t* dst = packed + ((static_cast<size_t>(t) * chunks + c) * oblocks + ob) * 512 + kp * 32;
      if (flipped) {
        const uint16_t* src = w + (static_cast<size_t>(source_tap) * Co + ob * 16) * Ci + ci;  // w[t'][ob*16][ci]
        if (pair) {
          _mm512_storeu_si512(dst, _mm512_i32gather_epi32(rows, src, 2));
        } else {
          for (int n = 0; n < 16; ++n) dst[2 * n] = src[static_cast<size_t>(n) * Ci];
        }
      } else {
        const uint16_t* src = w + (static_cast<size_t>(source_tap) * Ci + ci) * Co + ob * 16;  // w[t][ci][ob*16]
        const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        const __m512i b = pair ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + Co)))
                               : _mm512_setzero_si512();
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, interleave_idx, b));
      }
    }
  }
}

// The conv of `rows` output rows of one image. xp: their input rows, zero-padded, [rows+K-1, Wp, Cp] (Cp: Ci
// rounded up to 32, the rest zero), with zero slack after. The output positions are taken on xp's grid,
// q = oh * Wp + ow, so the pixels under a tap are q + kh * Wp + kw, 32 consecutive q's are two A tiles read
// straight from xp (row stride Cp), and the Wp - Wo columns past Wo are computed and dropped. NB: 1 or 2 blocks of
// 16 output channels per pass.
template <int K, int NB>
AMX_TARGET void AmxForwardRows(const uint16_t* xp, int Wp, int Cp, const uint16_t* wv, float* out, int rows,
                               int Wo, int Co) {
  ConfigureTiles();
  const int Q = rows * Wp, chunks = Cp / 32, oblocks = Co / 16;
  alignas(64) float stage[2][NB][256];
  for (int ob = 0; ob < oblocks; ob += NB) {
    for (int q0 = 0; q0 < Q; q0 += 32) {
      _tile_zero(0); _tile_zero(1);
      if constexpr (NB == 2) { _tile_zero(2); _tile_zero(3); }
      for (int kh = 0; kh < K; ++kh) {
        for (int kw = 0; kw < K; ++kw) {
          const uint16_t* a = xp + static_cast<size_t>(q0 + kh * Wp + kw) * Cp;
          const uint16_t* b = wv + static_cast<size_t>((kh * K + kw) * chunks * oblocks + ob) * 512;
          for (int c = 0; c < chunks; ++c, a += 32, b += static_cast<size_t>(oblocks) * 512) {
            _tile_loadd(4, a, Cp * 2);
            _tile_loadd(5, a + static_cast<size_t>(16) * Cp, Cp * 2);
            _tile_loadd(6, b, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            if constexpr (NB == 2) {
              _tile_loadd(7, b + 512, 64);
              _tile_dpbf16ps(2, 4, 7);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
        }
      }
      _tile_stored(0, stage[0][0], 64); _tile_stored(1, stage[1][0], 64);
      if constexpr (NB == 2) { _tile_stored(2, stage[0][1], 64); _tile_stored(3, stage[1][1], 64); }
      for (int m = 0; m < 32 && q0 + m < Q; ++m) {
        const int oh = (q0 + m) / Wp, ow = (q0 + m) % Wp;
        if (ow >= Wo) continue;
        float* dst = out + (static_cast<size_t>(oh) * Wo + ow) * Co + ob * 16;
        for (int j = 0; j < NB; ++j) std::memcpy(dst + j * 16, stage[m / 16][j] + (m % 16) * 16, 64);
      }
    }
  }
  _tile_release();
}

using AmxForwardFn = void (*)(const uint16_t*, int, int, const uint16_t*, float*, int, int, int);

AmxForwardFn PickAmxForward(int K, int Co) {
  if (Co % 32 == 0) return K == 2 ? AmxForwardRows<2, 2> : AmxForwardRows<3, 2>;
  return K == 2 ? AmxForwardRows<2, 1> : AmxForwardRows<3, 1>;
}

// The filter gradient's packing, vectorized. TransposeRow: W positions of x (Ci channels each, NHWC) to xt's rows
// (row ci at dst + ci * L, positions consecutive): per 16 positions and 2 channels one gather of the channel pairs
// and one permute that splits them into the two rows. Odd Ci: element by element.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void TransposeRow(const uint16_t* src, int W, int Ci, uint16_t* dst, size_t L) {
  if (Ci % 2) {
    for (int w = 0; w < W; ++w)
      for (int ci = 0; ci < Ci; ++ci) dst[ci * L + w] = src[static_cast<size_t>(w) * Ci + ci];
    return;
  }
  alignas(64) uint16_t split[32];  // lanes 0-15: the pairs' first channel, 16-31: their second
  for (int j = 0; j < 16; ++j) {
    split[j] = static_cast<uint16_t>(2 * j);
    split[16 + j] = static_cast<uint16_t>(2 * j + 1);
  }
  const __m512i split_idx = _mm512_load_si512(split);
  const __m512i offsets = LaneStrides(Ci);  // in uint16s; scale 2 below
  for (int w0 = 0; w0 < W; w0 += 16) {
    const int n = std::min(16, W - w0);
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
    const uint16_t* base = src + static_cast<size_t>(w0) * Ci;
    for (int ci = 0; ci < Ci; ci += 2) {
      const __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, offsets, base + ci, 2);
      const __m512i rows = _mm512_permutexvar_epi16(split_idx, pairs);
      _mm256_mask_storeu_epi16(dst + ci * L + w0, m, _mm512_castsi512_si256(rows));
      _mm256_mask_storeu_epi16(dst + (ci + 1) * L + w0, m, _mm512_extracti64x4_epi64(rows, 1));
    }
  }
}

// InterleavePair: dy's rows at two consecutive positions (nullptr: zeros) into AMX's B layout, [Co][2].
__attribute__((target("avx512f,avx512bw,avx512vl")))
void InterleavePair(const uint16_t* a, const uint16_t* b, int Co, uint16_t* dst) {
  const __m512i lo_idx = PairInterleave(0), hi_idx = PairInterleave(16);  // channels c0..c0+15, c0+16..c0+31
  for (int c0 = 0; c0 < Co; c0 += 32) {
    const bool full = Co - c0 >= 32;  // else 16 (Co is a multiple of 16)
    const __mmask32 m = full ? 0xFFFFFFFFu : 0xFFFFu;
    const __m512i va = a ? _mm512_maskz_loadu_epi16(m, a + c0) : _mm512_setzero_si512();
    const __m512i vb = b ? _mm512_maskz_loadu_epi16(m, b + c0) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + c0 * 2, _mm512_permutex2var_epi16(va, lo_idx, vb));
    if (full) _mm512_storeu_si512(dst + c0 * 2 + 32, _mm512_permutex2var_epi16(va, hi_idx, vb));
  }
}

// The filter gradient of one band of output rows of one image, added to dw: per tap t, dw[t][ci][co] +=
// sum_q xt[ci][q + shift_t] * dyv[q][co], with q = oh * Wp + ow on the band's padded grid (dy zero at the Wp - Wo
// columns past it) and shift_t = kh * Wp + kw. xt: the band's input rows padded and transposed, [Cp, L] (row
// stride L); dyv: dy in AMX's B layout, [Q/2, Co, 2]; dw: float32 [K*K, Cp, Co]. Each (tap, 32 input channels,
// NB*16 output channels) block of dw is loaded into tiles, takes every q of the band (xt and dyv in L2), and is
// stored back.
template <int K, int NB>
AMX_TARGET void AmxFilterGradBand(const uint16_t* xt, size_t L, const uint16_t* dyv, int Q, float* dw, int Cp,
                                  int Co, int Wp) {
  ConfigureTiles();
  const int dw_stride = Co * 4;
  for (int t = 0; t < K * K; ++t) {
    const int shift = (t / K) * Wp + t % K;
    for (int c0 = 0; c0 < Cp; c0 += 32) {
      for (int o0 = 0; o0 < Co; o0 += 16 * NB) {
        float* out = dw + (static_cast<size_t>(t) * Cp + c0) * Co + o0;
        _tile_loadd(0, out, dw_stride);
        _tile_loadd(1, out + 16 * Co, dw_stride);
        if constexpr (NB == 2) { _tile_loadd(2, out + 16, dw_stride); _tile_loadd(3, out + 16 * Co + 16, dw_stride); }
        const uint16_t* a0 = xt + static_cast<size_t>(c0) * L + shift;
        const uint16_t* a1 = a0 + 16 * L;
        const uint16_t* b = dyv + static_cast<size_t>(o0) * 2;
        for (int q = 0; q < Q; q += 32, a0 += 32, a1 += 32, b += static_cast<size_t>(Co) * 32) {
          _tile_loadd(4, a0, L * 2);
          _tile_loadd(5, a1, L * 2);
          _tile_loadd(6, b, Co * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          if constexpr (NB == 2) {
            _tile_loadd(7, b + 32, Co * 4);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, out, dw_stride);
        _tile_stored(1, out + 16 * Co, dw_stride);
        if constexpr (NB == 2) { _tile_stored(2, out + 16, dw_stride); _tile_stored(3, out + 16 * Co + 16, dw_stride); }
      }
    }
  }
  _tile_release();
}

using AmxFilterGradFn = void (*)(const uint16_t*, size_t, const uint16_t*, int, float*, int, int, int);

AmxFilterGradFn PickAmxFilterGrad(int K, int Co) {
  if (Co % 32 == 0) return K == 2 ? AmxFilterGradBand<2, 2> : AmxFilterGradBand<3, 2>;
  return K == 2 ? AmxFilterGradBand<2, 1> : AmxFilterGradBand<3, 1>;
}

// ---------------------------------------------------------------- bfloat16 on AVX512-BF16 (no AMX)
// The same two bfloat16 kernels for CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later, Intel Cooper Lake): one
// vdpbf16ps adds to 16 float32 lanes the products of 16 pairs of bfloat16 with one broadcast pair, 32 multiply-adds
// per instruction where float32's FMA does 16 (on a 2-core Zen 4: 234 GFLOP/s per core, its float32 FMA 117). Each
// product of two bfloat16 is exact in float32 and the sums are float32 (round to nearest even), as on AMX. They read
// the AMX kernels' packings unchanged: the kernel's pairs of input channels x 16 output channels (PackKernelChunk)
// are the B operand, a pair of x's channels (NHWC: adjacent) the broadcast; for the filter gradient dy's pairs of
// positions (InterleavePair) and x's transposed rows (TransposeRow), whose two adjacent positions are the broadcast.
// Register blocks as the float32 kernels': PB pixels (or CB input channels) x NB*16 output channels in <= 24 zmm.
#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

DP_TARGET inline __m512bh BroadcastPair(const uint16_t* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// PB output pixels w0 .. w0+PB-1 of output row oh, output channels ob*16 .. (ob+NB)*16 - 1. xp, Wp, Cp, wv as in
// AmxForwardRows (xp's pixel stride Cp, wv [K*K][Cp/32][Co/16][16 pairs][16][2]).
template <int K, int NB, int PB>
DP_TARGET void DpForwardBlock(const uint16_t* xp, int Wp, int Cp, const uint16_t* wv, float* out, int Wo, int Co,
                              int oh, int w0, int ob) {
  const int chunks = Cp / 32, oblocks = Co / 16;
  __m512 acc[PB][NB];
  for (int p = 0; p < PB; ++p)
    for (int j = 0; j < NB; ++j) acc[p][j] = _mm512_setzero_ps();
  for (int kh = 0; kh < K; ++kh) {
    for (int kw = 0; kw < K; ++kw) {
      const uint16_t* xr = xp + (static_cast<size_t>(oh + kh) * Wp + w0 + kw) * Cp;
      const uint16_t* wt = wv + (static_cast<size_t>(kh * K + kw) * chunks * oblocks + ob) * 512;
      for (int c = 0; c < chunks; ++c) {
        const uint16_t* xc = xr + c * 32;
        const uint16_t* wc = wt + static_cast<size_t>(c) * oblocks * 512;
        for (int kp = 0; kp < 16; ++kp) {
          __m512bh wp[NB];
          for (int j = 0; j < NB; ++j) wp[j] = (__m512bh)_mm512_loadu_si512(wc + j * 512 + kp * 32);
          for (int p = 0; p < PB; ++p) {
            const __m512bh xv = BroadcastPair(xc + static_cast<size_t>(p) * Cp + 2 * kp);
            for (int j = 0; j < NB; ++j) acc[p][j] = _mm512_dpbf16_ps(acc[p][j], xv, wp[j]);
          }
        }
      }
    }
  }
  float* dst = out + (static_cast<size_t>(oh) * Wo + w0) * Co + ob * 16;
  for (int p = 0; p < PB; ++p)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(dst + static_cast<size_t>(p) * Co + j * 16, acc[p][j]);
}

// AmxForwardRows' contract on AVX512-BF16: `rows` output rows of one image.
template <int K, int NB, int PB>
DP_TARGET void DpForwardRows(const uint16_t* xp, int Wp, int Cp, const uint16_t* wv, float* out, int rows, int Wo,
                             int Co) {
  for (int oh = 0; oh < rows; ++oh)
    for (int ob = 0; ob < Co / 16; ob += NB)
      AlongRow<PB>(Wo, [&](auto pixels, int w0) {
        DpForwardBlock<K, NB, decltype(pixels)::value>(xp, Wp, Cp, wv, out, Wo, Co, oh, w0, ob);
      });
}

template <int K>
AmxForwardFn PickDpForwardFor(int Co) {
  return ForwardRegisterBlock(Co, [](auto nb, auto pb) -> AmxForwardFn {
    return DpForwardRows<K, decltype(nb)::value, decltype(pb)::value>;
  });
}

// AmxFilterGradBand's contract on AVX512-BF16. A block of CB input channels (CB divides 32, so blocks never cross
// Cp) x NB*16 output channels of one tap's dw stays in registers while the band's pairs of positions stream past:
// per pair NB loads of dyv, CB broadcasts of xt's adjacent positions, CB*NB vdpbf16ps.
template <int K, int NB, int CB>
DP_TARGET void DpFilterGradBand(const uint16_t* xt, size_t L, const uint16_t* dyv, int Q, float* dw, int Cp, int Co,
                                int Wp) {
  for (int t = 0; t < K * K; ++t) {
    const int shift = (t / K) * Wp + t % K;
    for (int c0 = 0; c0 < Cp; c0 += CB) {
      for (int o0 = 0; o0 < Co; o0 += 16 * NB) {
        float* out = dw + (static_cast<size_t>(t) * Cp + c0) * Co + o0;
        __m512 acc[CB][NB];
        for (int i = 0; i < CB; ++i)
          for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_loadu_ps(out + static_cast<size_t>(i) * Co + j * 16);
        const uint16_t* a = xt + static_cast<size_t>(c0) * L + shift;
        const uint16_t* b = dyv + static_cast<size_t>(o0) * 2;
        for (int q = 0; q < Q; q += 2, a += 2, b += static_cast<size_t>(Co) * 2) {
          __m512bh d[NB];
          for (int j = 0; j < NB; ++j) d[j] = (__m512bh)_mm512_loadu_si512(b + j * 32);
          for (int i = 0; i < CB; ++i) {
            const __m512bh xv = BroadcastPair(a + static_cast<size_t>(i) * L);
            for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, d[j]);
          }
        }
        for (int i = 0; i < CB; ++i)
          for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + static_cast<size_t>(i) * Co + j * 16, acc[i][j]);
      }
    }
  }
}

template <int K>
AmxFilterGradFn PickDpFilterGradFor(int Co) {
  if (Co % 64 == 0) return DpFilterGradBand<K, 4, 4>;
  if (Co % 48 == 0) return DpFilterGradBand<K, 3, 8>;
  if (Co % 32 == 0) return DpFilterGradBand<K, 2, 8>;
  return DpFilterGradBand<K, 1, 16>;
}

// Which bfloat16 kernels run: AMX's once Linux granted this process the tile state (EnableAmx) unless UseAmx(0)
// chose AVX512-BF16's (tests check both on an AMX host); __init__.py calls neither on a CPU that has neither.
std::atomic<bool> amx_granted{false}, amx_chosen{true};

bool RunAmx() { return amx_granted.load() && amx_chosen.load(); }

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

// The sizes of a call ConvShapesFit accepted: x [B,H,W,Ci], the kernel [K,K,Ci,Co], y / dy [B,Ho,Wo,Co], padding P.
template <typename Dims>
Shape ShapeOf(const Dims& xd, const Dims& kd, const Dims& yd, int64_t padding) {
  return Shape{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(xd[2]), static_cast<int>(yd[1]),
               static_cast<int>(yd[2]), static_cast<int>(xd[3]), static_cast<int>(yd[3]), static_cast<int>(padding),
               static_cast<int>(kd[0])};
}

// Bands of each image's output rows, the tasks of a call: at least 2 per thread of XLA's pool even when a device
// holds 1-2 images (sampling, evaluation); one band per image at larger batches.
struct RowBands { int count, rows; };

RowBands BandsFor(ffi::ThreadPool& pool, int B, int Ho) {
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  const int count = std::min(Ho, std::max(1, (2 * threads + B - 1) / B));
  return {count, (Ho + count - 1) / count};
}

// Both float32 handlers' signature: XLA's intra-op pool, two float32 arrays in, one out, the padding as an attribute.
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
  const Shape s = ShapeOf(xd, wd, yd, padding);
  RangeFn fn;
  int cb;
  Pick(s.K, s.Co, &fn, &cb);
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
  const Shape s = ShapeOf(xd, wd, yd, padding);
  const int B = s.B, H = s.H, W = s.W, Ci = s.Ci, Co = s.Co, P = s.P, Ho = s.Ho, Wo = s.Wo, K = s.K;
  const ForwardFn fn = K == 2 ? PickForwardFor<2>(Co) : PickForwardFor<3>(Co);
  const int Wp = Wo + K - 1;
  const RowBands band = BandsFor(pool, B, Ho);
  const int bands = band.count, band_rows = band.rows;
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

// ---------------------------------------------------------------- bfloat16 handlers (AMX)

// Asks Linux for the AMX tile state (a process must before its first tile instruction); 0 when granted.
extern "C" int EnableAmx() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  const int result = static_cast<int>(syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata));
  if (result == 0) amx_granted.store(true);
  return result;
}

// on != 0: AMX's bfloat16 kernels where granted (the default); 0: AVX512-BF16's.
extern "C" void UseAmx(int on) { amx_chosen.store(on != 0); }

// bfloat16 x and w (or dy), a float32 result.
static auto TwoBf16ArraysAndPadding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("padding");
}

// `flipped` (0 or 1): w is the forward conv's kernel [K,K,Co,Ci] (this conv's Co its Ci) and this conv takes it
// flipped in space and transposed, as the input gradient does (PackKernelChunk).
static ffi::Error ConvBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                               ffi::ResultBuffer<ffi::F32> y, int64_t padding, int64_t flipped) {
  const auto xs_dims = x.dimensions(), ws_dims = w.dimensions(), ys_dims = y->dimensions();
  const std::vector<int64_t> xd(xs_dims.begin(), xs_dims.end()), yd(ys_dims.begin(), ys_dims.end());
  std::vector<int64_t> wd(ws_dims.begin(), ws_dims.end());  // as [K,K,Ci,Co]
  if (flipped && wd.size() == 4) std::swap(wd[2], wd[3]);
  if (!ConvShapesFit(xd, wd, yd, padding))
    return ffi::Error::InvalidArgument("conv (bfloat16): expected x [B,H,W,Cin], w [K,K,Cin,Cout] ([K,K,Cout,Cin] "
                                       "when flipped) with Cout a multiple of 16, y [B,H+2P-K+1,W+2P-K+1,Cout], "
                                       "K 2 or 3, 0 <= P < K");
  const Shape s = ShapeOf(xd, wd, yd, padding);
  const int B = s.B, H = s.H, W = s.W, Ci = s.Ci, Co = s.Co, P = s.P, Ho = s.Ho, Wo = s.Wo, K = s.K;
  const int Wp = Wo + K - 1, Cp = (Ci + 31) / 32 * 32, chunks = Cp / 32;
  std::vector<uint16_t> wv(static_cast<size_t>(K) * K * Cp * Co, 0);
  const uint16_t* ws = w.typed_data();
  uint16_t* wvp = wv.data();
  ParallelFor(pool, K * K * chunks, [=](int task) {
    PackKernelChunk(ws, K * K, Ci, Co, flipped != 0, task / chunks, task % chunks, wvp);
  });
  const AmxForwardFn fn = RunAmx() ? PickAmxForward(K, Co) : K == 2 ? PickDpForwardFor<2>(Co) : PickDpForwardFor<3>(Co);
  const RowBands band = BandsFor(pool, B, Ho);
  const int bands = band.count, band_rows = band.rows;
  const uint16_t* xs = x.typed_data();
  const uint16_t* wp = wv.data();
  float* ys = y->typed_data();
  ParallelFor(pool, B * bands, [=](int task) {
    const int b = task / bands, oh0 = (task % bands) * band_rows, rows = std::min(band_rows, Ho - oh0);
    if (rows <= 0) return;
    // padded row r is x's row oh0 + r - P; one zero row and 32 positions of slack for the last block's reads
    std::vector<uint16_t> xp((static_cast<size_t>(rows + K) * Wp + 32) * Cp, 0);
    for (int r = 0; r < rows + K - 1; ++r) {
      const int h = oh0 + r - P;
      if (h < 0 || h >= H) continue;
      const uint16_t* src = xs + (static_cast<size_t>(b) * H + h) * W * Ci;
      uint16_t* dst = xp.data() + (static_cast<size_t>(r) * Wp + P) * Cp;
      if (Cp == Ci) std::memcpy(dst, src, sizeof(uint16_t) * W * Ci);
      else for (int j = 0; j < W; ++j) std::memcpy(dst + j * Cp, src + j * Ci, sizeof(uint16_t) * Ci);
    }
    fn(xp.data(), Wp, Cp, wp, ys + (static_cast<size_t>(b) * Ho + oh0) * Wo * Co, rows, Wo, Co);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBf16, ConvBf16Impl, TwoBf16ArraysAndPadding().Attr<int64_t>("flipped"));

static ffi::Error ConvFilterGradBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> dy,
                                         ffi::ResultBuffer<ffi::F32> dw, int64_t padding) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (!ConvShapesFit(xd, wd, yd, padding))
    return ffi::Error::InvalidArgument("conv_filter_grad (bfloat16): expected x [B,H,W,Cin], dy "
                                       "[B,H+2P-K+1,W+2P-K+1,Cout] with Cout a multiple of 16, dw [K,K,Cin,Cout], "
                                       "K 2 or 3, 0 <= P < K");
  const Shape s = ShapeOf(xd, wd, yd, padding);
  const int B = s.B, H = s.H, W = s.W, Ci = s.Ci, Co = s.Co, P = s.P, Ho = s.Ho, Wo = s.Wo, K = s.K;
  const int Wp = Wo + K - 1, Cp = (Ci + 31) / 32 * 32;
  // Work units: bands of each image's output rows, at least 2 per thread; groups of consecutive units, one per
  // task, each summing into its own float32 copy of dw (added up at the end).
  const RowBands band = BandsFor(pool, B, Ho);
  const int bands = band.count, band_rows = band.rows;
  const int units = B * bands;
  const int groups = static_cast<int>(std::min<int64_t>(units, 2 * std::max<int64_t>(1, pool.num_threads())));
  const size_t dw_size = static_cast<size_t>(K) * K * Cp * Co;
  // zeroed by each task, and added up below in parallel: on one thread these two passes over groups copies of a
  // [3,3,512,256] dw took milliseconds per call
  std::unique_ptr<float[]> partial(new float[groups * dw_size]);
  const AmxFilterGradFn fn =
      RunAmx() ? PickAmxFilterGrad(K, Co) : K == 2 ? PickDpFilterGradFor<2>(Co) : PickDpFilterGradFor<3>(Co);
  const uint16_t *xs = x.typed_data(), *dys = dy.typed_data();
  float* parts = partial.get();
  ParallelFor(pool, groups, [=](int g) {
    std::fill(parts + g * dw_size, parts + (g + 1) * dw_size, 0.0f);
    const size_t L = static_cast<size_t>(band_rows + K) * Wp + 64;  // a band's padded rows and the shifts' slack
    const int q_max = (band_rows * Wp + 31) / 32 * 32;
    std::vector<uint16_t> xt(static_cast<size_t>(Cp) * L), dyv(static_cast<size_t>(q_max) * Co);
    for (int u = g * units / groups; u < (g + 1) * units / groups; ++u) {
      const int b = u / bands, oh0 = (u % bands) * band_rows, rows = std::min(band_rows, Ho - oh0);
      if (rows <= 0) continue;
      const int Q = (rows * Wp + 31) / 32 * 32;
      std::fill(xt.begin(), xt.end(), 0);
      // padded row r is x's row oh0 + r - P, padded column c its column c - P; transposed: xt[ci][r * Wp + c]
      for (int r = 0; r < rows + K - 1; ++r) {
        const int h = oh0 + r - P;
        if (h >= 0 && h < H)
          TransposeRow(xs + (static_cast<size_t>(b) * H + h) * W * Ci, W, Ci,
                       xt.data() + static_cast<size_t>(r) * Wp + P, L);
      }
      // every pair of positions q, q + 1 of the band (zeros past each row's Wo columns and past its rows)
      const auto dy_at = [&](int q) -> const uint16_t* {
        const int oh = q / Wp, ow = q % Wp;
        return oh < rows && ow < Wo ? dys + ((static_cast<size_t>(b) * Ho + oh0 + oh) * Wo + ow) * Co : nullptr;
      };
      for (int q = 0; q < Q; q += 2)
        InterleavePair(dy_at(q), dy_at(q + 1), Co, dyv.data() + static_cast<size_t>(q) * Co);
      fn(xt.data(), L, dyv.data(), Q, parts + g * dw_size, Cp, Co, Wp);
    }
  });
  float* out = dw->typed_data();
  const int dw_rows = K * K * Ci, sum_tasks = std::min(dw_rows, 4 * groups);
  ParallelFor(pool, sum_tasks, [=](int task) {
    for (int row = task * dw_rows / sum_tasks; row < (task + 1) * dw_rows / sum_tasks; ++row) {
      const int t = row / Ci, ci = row % Ci;
      float* dst = out + (static_cast<size_t>(t) * Ci + ci) * Co;
      const float* src = parts + (static_cast<size_t>(t) * Cp + ci) * Co;
      std::memcpy(dst, src, sizeof(float) * Co);
      for (int g = 1; g < groups; ++g)
        for (int co = 0; co < Co; ++co) dst[co] += src[g * dw_size + co];
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFilterGradBf16, ConvFilterGradBf16Impl, TwoBf16ArraysAndPadding());
