"""Every random key and data order of a run, derived in one place from `config.seed`.

One split of the root key gives one key per purpose, named, so that no two purposes ever share a key and
adding a purpose is one field. Inside loops, the step (or batch index) is folded into a purpose's key
(`fold_in(keys.train, step)`), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class RunKeys:
  """Base keys, one per purpose; fold the step or batch index in before drawing."""

  autoencoder_init: jax.Array  # stage 1: the autoencoder's initial params
  autoencoder_train: jax.Array  # stage 1: posterior draws of each train step
  latent_scale: jax.Array  # stage 1: posterior draws that measure the latent scale
  init: jax.Array  # the diffusion model's initial params
  train: jax.Array  # each train step: timesteps, noise, dropout, condition dropout
  encode: jax.Array  # stage 2 of latent diffusion: posterior draws of each batch's latents
  preview: jax.Array  # preview grids during training
  sample: jax.Array  # the final samples
  eval: jax.Array  # evaluation: the bits/dim bound's noise
  edit: jax.Array  # mode=edit: the noise of inpainting, outpainting, img2img, upscaling

  # A new purpose goes last: with JAX's partitionable threefry (its default), split(root, n + 1)[:n] equals
  # split(root, n), so every earlier key, and the runs measured with it, stay bit-identical.
  @classmethod
  def from_seed(cls, seed: int) -> "RunKeys":
    fields = dataclasses.fields(cls)
    return cls(*jax.random.split(jax.random.key(seed), len(fields)))


# Data order: numpy permutations seeded by [seed + offset, epoch] (data.InMemoryBatches), one stream per stage.
DATA_SEED_OFFSET = {"diffusion": 0, "autoencoder": 1}


def data_seed(seed: int, stage: str) -> int:
  """The shuffling seed of a stage's data stream ('diffusion' or 'autoencoder')."""
  return seed + DATA_SEED_OFFSET[stage]
