"""Helpers shared by the bench scripts: load a config file by name, apply key=value overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG_DIR = os.path.join(ROOT, "configs")


def load_config(name: str):
  """'fashion_mnist' or 'fashion_mnist:full' -> configs/fashion_mnist.py's get_config(variant)."""
  file, _, variant = name.partition(":")
  spec = importlib.util.spec_from_file_location(file, os.path.join(CONFIG_DIR, file + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def apply_overrides(config, overrides):
  """'model.ch=16' style overrides, values parsed as Python literals where they parse."""
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def print_table(rows: list[dict]) -> None:
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def restore_workdir(config, workdir: str):
  """A trained workdir's (mesh, model, schedule, decoder or None, state) at its latest checkpoint."""
  import jax
  from diffusion_jax import checkpoint, latent, train
  from diffusion_jax.parallel.mesh import make_mesh
  mesh = make_mesh()
  model, schedule = train.build_model(config), train.build_schedule(config)
  tx, _ = train.build_optimizer(config)
  shape = train.image_shape(config)
  decoder = None
  if train.is_latent(config):  # sample latents, decode with the workdir's finished autoencoder
    ae_model, ae_params, scale = latent.prepare_autoencoder(config, workdir, mesh, None, train=False)
    decoder = latent.LatentDecoder(ae_model, ae_params, scale)
    shape = ae_model.latent_shape(shape)
  state, _ = train.create_train_state(model, tx, jax.random.key(0), shape, mesh, schedule.num_timesteps)
  state = checkpoint.restore(checkpoint.make_manager(workdir), state)
  return mesh, model, schedule, decoder, state


def sampling_condition(config, num_images: int, encoder=None):
  """(labels, prompts, cond, null_cond) for sampling `num_images` from the config's kind of model (all None/{}
  for an unconditional one); loads the text encoder when the model needs it and none is given."""
  from diffusion_jax import conditioning as C
  if C.condition_kind(config) == "text" and encoder is None:
    encoder = C.load_encoder(config)
  return C.sampling_inputs(config, num_images, encoder)
