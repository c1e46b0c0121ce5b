"""FID's Inception-v3 (the TF 2015-12-05 graph as pytorch-fid ports it) in Flax, and its weight loader.

The network is torchvision's Inception-v3 with pytorch-fid's FID patches: average pools in the A, C and
E_1 blocks exclude the zero padding (TF semantics) and the last E block max-pools. Module names follow
pytorch-fid's state dict, so `pt_inception-2015-12-05-6726825d.pth` maps onto it key by key. The file
is read without torch by `diffusion_jax.weights.torch_pickle` and fetched by `diffusion_jax.weights.download`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from diffusion_jax.weights.download import default_cache_dir, download_file
from diffusion_jax.weights.torch_pickle import load_torch_state_dict

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


class BasicConv(nn.Module):
  """conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU (torchvision's BasicConv2d)."""

  features: int
  kernel: Sequence[int]
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), (self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_tf(x):  # 3x3 stride 1 average that ignores the zero padding (TF; pytorch-fid's patch)
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_tf(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, name="branch7x7_2", **row)(b7)
    b7 = BasicConv(192, name="branch7x7_3", **col)(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    for i, (features, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
      bd = BasicConv(features, name=f"branch7x7dbl_{i}", **shape)(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_tf(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # FIDInceptionE_2 max-pools (a quirk of the TF graph); E_1 averages

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool_branch else _avg_pool_tf(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images [B,H,W,3] in [0,1] -> pool3 features [B,2048] (bilinear resize to 299, scale to [-1,1])."""

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    # pytorch-fid: F.interpolate(bilinear, align_corners=False) == half-pixel bilinear without antialiasing.
    x = jax.image.resize(x, (b, 299, 299, x.shape[-1]), "bilinear", antialias=False)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # [B,2048] adaptive average pool


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid keys (Mixed_5b.branch1x1.conv.weight, .bn.running_mean, ...) -> Flax variables."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    *path, leaf = key.split(".")
    if path[0] in ("fc", "AuxLogits") or leaf == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    if leaf == "weight" and path[-1] == "conv":
      params[(*path, "kernel")] = value.transpose(2, 3, 1, 0)  # [out,in,kh,kw] -> [kh,kw,in,out]
    elif leaf in ("weight", "bias"):
      params[(*path, "scale" if leaf == "weight" else "bias")] = value
    elif leaf in ("running_mean", "running_var"):
      stats[(*path, "mean" if leaf == "running_mean" else "var")] = value
    else:
      raise ValueError(f"unexpected key {key!r} in an Inception state dict")
  return {"params": traverse_util.unflatten_dict(params), "batch_stats": traverse_util.unflatten_dict(stats)}


def default_weights_path() -> str:
  """Where the FID weights are read from: $DIFFUSION_JAX_INCEPTION_WEIGHTS, else the weights cache."""
  return os.environ.get("DIFFUSION_JAX_INCEPTION_WEIGHTS", os.path.join(default_cache_dir(), FID_WEIGHTS_NAME))


def load_inception_variables(path: str | None = None, *, download: bool = True) -> dict[str, Any]:
  """FID Inception variables from `path` (local or any epath; default: `default_weights_path()`), downloading
  the file there first when it is missing and `download` is set. FileNotFoundError (saying where to put the
  file) when it is missing and cannot be downloaded; ValueError when it holds other weights."""
  path = path or default_weights_path()
  put_it = (f"put it at {path}, or point DIFFUSION_JAX_INCEPTION_WEIGHTS (or config.eval.inception_weights) "
            "at the file")
  if not epath.Path(path).exists():
    if not download:
      raise FileNotFoundError(f"the FID Inception weights are not at {path}: download {FID_WEIGHTS_URL} and {put_it}")
    download_file(FID_WEIGHTS_URL, path, what_to_do_offline=f"without internet, download it elsewhere and {put_it}")
  variables = convert_state_dict(load_torch_state_dict(path))
  expected = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
  got = jax.tree.map(np.shape, variables)
  if jax.tree.map(lambda a: a.shape, expected) != got:
    raise ValueError(f"{path} does not hold the FID Inception-v3 weights (parameter shapes differ)")
  return variables


def make_inception_fn(variables: dict[str, Any], batch_size: int = 100) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [N,H,W,C] (C = 1 or 3) -> pool3 features [N,2048] float64 numpy."""
  apply = jax.jit(lambda x: FIDInceptionV3().apply(variables, x))

  def fn(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
      raise ValueError(f"Inception features need uint8 images [N,H,W,1|3], got {images.dtype} {images.shape}")
    out = []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size].astype(np.float32) / 255.0
      if chunk.shape[-1] == 1:
        chunk = np.repeat(chunk, 3, axis=-1)
      pad = batch_size - len(chunk)
      feats = apply(jnp.asarray(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))
      out.append(np.asarray(feats, np.float64)[:len(chunk)])
    return np.concatenate(out)

  return fn
