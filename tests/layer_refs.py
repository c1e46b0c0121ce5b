"""Float64 numpy references for the U-Net layers (DDPM appendix B, ADM), run on a Flax module's own params."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def to_numpy(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def silu(x):
  return x / (1 + np.exp(-x))


def group_norm(x, p, eps=1e-6):
  """GroupNorm(32) as DDPM, with gcd(32, C) groups when C cannot hold 32; statistics over H, W and the group."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, math.gcd(32, c), -1)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * p["scale"] + p["bias"]


def conv(x, p):
  """A 'same' kxk conv, stride 1, as a sum of shifted matmuls; kernel [k,k,Cin,Cout]."""
  k = p["kernel"].shape[0]
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w] @ p["kernel"][i, j] for i in range(k) for j in range(k)) + p["bias"]


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def avg_pool2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def nearest_up2(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def resblock(p, x, emb, *, scale_shift_norm, resample=None):
  """DDPM's residual block; scale_shift_norm: ADM's FiLM h = GN(h) (1 + scale) + shift, (scale, shift) =
  Dense(SiLU(emb)); resample: BigGAN-style up / down (nearest / 2x2 mean) of both paths after the first norm."""
  resize = {"up": nearest_up2, "down": avg_pool2, None: lambda a: a}[resample]
  h = conv(resize(silu(group_norm(x, p["GroupNorm_0"]))), p["Conv_0"])
  x = resize(x)
  e = dense(silu(emb), p["Dense_0"])[:, None, None, :]
  if scale_shift_norm:
    scale, shift = np.split(e, 2, axis=-1)
    h = group_norm(h, p["GroupNorm_1"]) * (1 + scale) + shift
  else:
    h = group_norm(h + e, p["GroupNorm_1"])
  h = conv(silu(h), p["Conv_1"])
  if "skip" in p:
    x = conv(x, p["skip"])
  return x + h


def softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def attention_block(p, x):
  """x + proj_out(softmax(Q K^T / sqrt(d)) V) over the H*W positions of GN(x), heads from the param shapes."""
  b, hgt, wid, c = x.shape
  h = group_norm(x, p["GroupNorm_0"]).reshape(b, hgt * wid, c)
  q, k, v = (np.einsum("bnc,chd->bnhd", h, p[n]["kernel"]) + p[n]["bias"] for n in "qkv")
  weights = softmax(np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1]), axis=-1)
  out = np.einsum("bhnm,bmhd->bnhd", weights, v)
  out = np.einsum("bnhd,hdc->bnc", out, p["proj_out"]["kernel"]) + p["proj_out"]["bias"]
  return x + out.reshape(x.shape)


def random_params(module, *args, scale=0.1, seed=3, **kwargs):
  """The module's params with every entry drawn from N(0, scale^2) (norm scales around 1), so that the
  zero-initialised convs and projections are not zero; shapes from jax.eval_shape, so nothing compiles."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = scale * rng.standard_normal(leaf.shape)
    return jnp.asarray(value + (jax.tree_util.keystr(path).endswith("['scale']")), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def perturb(params, scale, seed=2):
  """params + scale * N(0, 1) drawn in numpy (eager jax.random would compile once per parameter shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype), params)
