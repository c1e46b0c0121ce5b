"""A few train steps through the public pieces, on whatever processes and devices this run has."""

import jax

from diffusion_jax import build, train
from diffusion_jax.data import InMemoryBatches, load_split
from diffusion_jax.parallel import multihost
from diffusion_jax.parallel.mesh import batch_sharding, host_to_global, make_mesh


def run_steps(config, num_steps: int) -> list[float]:
  mesh = make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  parts = build.build_components(config)
  state, shardings = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                              parts.schedule.num_timesteps)
  step = train.compile_train_step(parts, mesh, shardings, donate=False)
  images, labels = load_split("fashion_mnist", "train", config.data.data_dir)
  batches = InMemoryBatches(images, labels, global_batch=config.batch_size, seed=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
  losses = []
  for s in range(num_steps):
    batch = host_to_global({"image": batches.batch(s)["image"]}, batch_sharding(mesh))
    if s == 0:  # as the library's loop does: with several processes, compiled first, then all wait for all
      step = multihost.compile_then_wait(step, state, batch, jax.random.key(1), None, name="run_steps")
    state, metrics = step(state, batch, jax.random.key(1), None)
    losses.append(float(metrics["loss"]))
  return losses
