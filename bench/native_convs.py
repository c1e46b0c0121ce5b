"""Per-convolution benchmark: XLA:CPU's conv and filter gradient against the native kernels
(diffusion_jax/models/native), float32 and bfloat16, at the U-Nets' shapes.

python bench/native_convs.py [--dtypes float32,bfloat16] [--batch 32] [--steps 20] [--small]
Prints a markdown table: for each [B,H,W,Cin] -> Cout stride-1 conv (3x3 'same', and the sub-pixel upsampling
conv's 2x2), XLA's and ours in ms (median over --steps compiled calls) with GFLOP/s, for the forward (the input
gradient is the same kernel on dy) and the filter gradient. XLA's forward in bfloat16 returns bfloat16, ours
float32 sums (what layers.xla_conv then casts); both are compared against float64 in tests/test_native.py. Pin it
(`taskset -c 0`) for one core. bfloat16 rows need a CPU with AMX or AVX512-BF16 (native.bf16_kernels() says which
kernels run).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import median_ms, print_table

from diffusion_jax.models import layers, native

# (x [B,H,W,Cin] with B filled in, Cout, K, P): fmnist_small's 3x3 convs, a ddpm_cifar10 one, the sub-pixel 2x2
# (layers.upsample_conv: padding 1, as layers._canonical_conv pads k // 2).
SHAPES = [((32, 32, 32), 32, 3, 1), ((32, 32, 64), 32, 3, 1), ((32, 32, 96), 32, 3, 1), ((16, 16, 64), 64, 3, 1),
          ((16, 16, 128), 64, 3, 1), ((8, 8, 64), 64, 3, 1), ((32, 32, 128), 128, 3, 1), ((16, 16, 64), 256, 2, 1)]


def xla_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_filter_grad(x, dy, kernel_size, padding):
  """XLA's filter gradient as the U-Net's step computes it (layers._canonical_conv_bwd: a conv of transposed x and
  dy; the 2x2 sub-pixel conv's x padded beforehand), with the native kernels switched off while tracing."""
  zero = jnp.zeros((kernel_size, kernel_size, x.shape[-1], dy.shape[-1]), x.dtype)
  with layers.native_convs(False):
    return jax.vjp(lambda k: layers._canonical_conv(x, k, 1, kernel_size == 2), zero)[1](dy)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--small", action="store_true", help="batch 2 at 8x8 (the test's quick run)")
  args = parser.parse_args()
  shapes = [((8, 8, cin), cout, k, pad) for (_, _, cin), cout, k, pad in SHAPES[:2] + SHAPES[-1:]] if args.small \
      else SHAPES
  batch = 2 if args.small else args.batch
  print(f"native kernels: {native.available() or native.unavailable_reason()}; bfloat16 kernels: "
        f"{native.bf16_kernels()}; {jax.device_count()} device(s)")
  rows = []
  for dtype in args.dtypes.split(","):
    for (h, w, cin), cout, k, pad in shapes:
      keys = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(keys[0], (batch, h, w, cin)).astype(dtype)
      kernel = (0.1 * jax.random.normal(keys[1], (k, k, cin, cout))).astype(dtype)
      dy = jax.random.normal(keys[2], (batch, *native.output_size(x.shape, k, pad), cout)).astype(dtype)
      flops = 2 * dy.size * k * k * cin
      row = {"dtype": dtype, "conv (x -> Cout)": f"[{batch},{h},{w},{cin}] -> {cout}, {k}x{k}"}
      for what, xla_fn, ours_fn, takes, operands in [
          ("forward", xla_conv, native.conv, native.takes_conv(x, kernel, pad), (x, kernel)),
          ("filter gradient", lambda x, dy, p: xla_filter_grad(x, dy, k, p),
           lambda x, dy, p: native.conv_filter_grad(x, dy, k, p), native.takes_conv_filter_grad(x, dy, k, pad),
           (x, dy))]:
        xla_ms = median_ms(jax.jit(xla_fn, static_argnums=2), *operands, pad, steps=args.steps)
        ours_ms = median_ms(jax.jit(ours_fn, static_argnums=2), *operands, pad, steps=args.steps) if takes else None
        row[f"{what} XLA ms (GFLOP/s)"] = f"{xla_ms:.2f} ({flops / xla_ms / 1e6:.0f})"
        row[f"{what} ours ms (GFLOP/s)"] = (f"{ours_ms:.2f} ({flops / ours_ms / 1e6:.0f}), {xla_ms / ours_ms:.2f}x"
                                            if ours_ms else "not taken")
      rows.append(row)
  print_table(rows)


if __name__ == "__main__":
  main()
