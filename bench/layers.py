"""Layer benchmark: this project's GroupNorm (+ SiLU, as the U-Net uses it) against flax's nn.GroupNorm.

python bench/layers.py [--batch 16,64] [--steps 30]
Prints a markdown table: forward and forward+backward ms (median over --steps compiled calls) for the U-Net's
normalization shapes [B,H,W,C] with 32 groups, and the speed-up. Both compute the same values (tests/test_layers.py).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from common import median_ms, print_table

from diffusion_jax.models.layers import GroupNorm

# (size, channels): fmnist_small's and ddpm_cifar10's normalizations (64 at 32x32: a skip concatenation).
SHAPES = [(32, 32), (32, 64), (16, 64), (16, 128), (8, 64), (32, 128), (32, 256)]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", default="16,64", help="comma-separated batch sizes")
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for batch in map(int, args.batch.split(",")):
    for size, channels in SHAPES:
      x = jnp.asarray(rng.standard_normal((batch, size, size, channels)) * 2 + 1, jnp.float32)
      cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
      params = {"params": {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}}
      row = dict(shape=f"[{batch},{size},{size},{channels}]")
      flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6)
      # Ours as the U-Net calls it: SiLU inside the layer (one pass forward, a written-out backward).
      for name, apply in (("flax", lambda p, x: nn.silu(flax_gn.apply(p, x))),
                          ("ours", GroupNorm(32, silu=True).apply)):
        forward = jax.jit(apply)
        backward = jax.jit(jax.grad(lambda p, x, f=apply: jnp.vdot(f(p, x), cotangent), argnums=(0, 1)))
        row[f"{name} fwd ms"] = median_ms(forward, params, x, steps=args.steps)
        row[f"{name} fwd+bwd ms"] = median_ms(backward, params, x, steps=args.steps)
      row["speed-up fwd / fwd+bwd"] = (f"{row['flax fwd ms'] / row['ours fwd ms']:.2f}x / "
                                       f"{row['flax fwd+bwd ms'] / row['ours fwd+bwd ms']:.2f}x")
      rows.append({k: f"{v:.2f}" if isinstance(v, float) else v for k, v in row.items()})
  print(f"GroupNorm(32) + SiLU on {jax.devices()[0].platform}, {jax.device_count()} device(s)\n")
  print_table(rows)


if __name__ == "__main__":
  main()
