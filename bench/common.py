"""Helpers shared by the bench scripts: a config by name with `--set a.b=value` overrides (parsed by
diffusion_jax.config.load_config, exactly as main's --config.a.b flags), a table printer, a restored workdir."""

from __future__ import annotations

from diffusion_jax.config import load_config  # noqa: F401  (the scripts' one config loader)


def print_table(rows: list[dict]) -> None:
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def restore_workdir(config, workdir: str):
  """A trained workdir's (mesh, components, decoder or None, text encoder or None, state) at its latest
  checkpoint."""
  import jax
  from diffusion_jax import build, checkpoint, latent, train
  from diffusion_jax.keys import RunKeys
  from diffusion_jax.parallel.mesh import make_mesh
  mesh, parts = make_mesh(), build.build_components(config)
  decoder = None
  if parts.autoencoder is not None:  # sample latents, decode with the workdir's finished autoencoder
    decoder = latent.prepare_autoencoder(config, parts.autoencoder, workdir, mesh, None, RunKeys.from_seed(0))
  state, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                      parts.schedule.num_timesteps)
  state = checkpoint.restore(checkpoint.make_manager(workdir), state)
  return mesh, parts, decoder, build.load_text_encoder(config), state


def make_sampler(parts, settings, mesh, decoder):
  """The compiled sample function of a workdir's model with these SampleSettings."""
  from diffusion_jax.sampling import make_sample_fn
  return make_sample_fn(parts.model, parts.schedule, settings, mesh, parts.input_shape,
                        prediction=parts.diffusion.prediction, variance=parts.diffusion.variance, decoder=decoder)
