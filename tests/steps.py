"""A few train steps through the public pieces, on whatever processes and devices this run has."""

import jax
import orbax.checkpoint as ocp

from diffusion_jax import build, train
from diffusion_jax.data import InMemoryBatches, load_split
from diffusion_jax.parallel.mesh import batch_sharding, host_to_global, make_mesh


def wait_for_all_processes(name: str) -> None:
  """A coordination-service barrier (no device collective, so no gloo context to time out while peers compile)."""
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=600_000)


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
    if s == 0 and jax.process_count() > 1:
      # Compile first, then wait for every process: XLA:CPU's gloo collectives give up on a peer that reaches the
      # first cross-process collective more than 30 s later, and compile times differ that much between
      # processes sharing 2 cores.
      step = step.lower(state, batch, jax.random.key(1), None).compile()
      wait_for_all_processes("run_steps_compiled")
    state, metrics = step(state, batch, jax.random.key(1), None)
    losses.append(float(metrics["loss"]))
  return losses
