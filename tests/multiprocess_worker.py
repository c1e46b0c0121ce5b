"""One process of an N-process CPU job (run by test_multiprocess.py): 2 local devices each, gloo collectives.

argv: port process_id num_processes data_dir workdir checkpoint_workdir [job]. Prints the losses of 3 train steps
FSDP-sharded across every process (FSDP_LOSSES), and with 2 processes replicated across both (DP_LOSSES), restores
the checkpoint that the test wrote on one process (8 devices, fsdp=4) onto this job's FSDP mesh and checks every
leaf against the test's copy (RESTORED); with `job` instead runs the whole job, latent and text-conditional
(LATENT_SCALE).
"""

import os
import sys
import time

start = time.time()

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
# No persistent compilation cache here: a process that finds its programs cached reaches the first cross-process
# collective long before one that compiles, and gloo gives up on a peer after 30 s (DEADLINE_EXCEEDED).
port, process_id, num_processes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data_dir, workdir, checkpoint_workdir = sys.argv[4:7]
whole_job = sys.argv[7:] == ["job"]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                           process_id=process_id)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from helpers import tiny_config, tiny_latent_config  # noqa: E402
from steps import run_steps  # noqa: E402

from diffusion_jax import build, checkpoint, train  # noqa: E402
from diffusion_jax.parallel import multihost  # noqa: E402
from diffusion_jax.parallel.mesh import make_mesh  # noqa: E402

flags.FLAGS(sys.argv[:1])  # as main does (absl parses the flags; Orbax reads its barrier flag from them)
multihost.use_coordination_barriers()  # what main's start-up does after jax.distributed.initialize

if not whole_job:
  devices = 2 * num_processes
  assert jax.device_count() == devices and jax.local_device_count() == 2
  config = tiny_config(data_dir)
  config.mesh.fsdp = devices  # FSDP across every process: each large parameter split over all devices
  if num_processes == 4 and process_id == 3:
    # The last process starts its first step 35 s after the others: without the barrier after compiling
    # (multihost.compile_then_wait) gloo gives up on it after 30 s (DEADLINE_EXCEEDED). In the 4-process run (the
    # slow tier) since the 35 s wait put the 2-process test past the default tier's time budget.
    time.sleep(35)
  print("FSDP_LOSSES", " ".join(f"{x:.8f}" for x in run_steps(config, num_steps=3)), flush=True)
  print(f"at {time.time() - start:.1f}s", flush=True)
  if num_processes == 2:
    # Replicated over both processes (plain data parallel): the step averages its gradients as one flat vector
    # (parallel.mesh.flat_gradient_reduce: gloo reduces XLA's tuple all-reduce one buffer at a time).
    config.mesh.fsdp = 1
    from diffusion_jax import train_state
    flat_traces, flat_fn = [], train_state.flat_reduced_value_and_grad
    train_state.flat_reduced_value_and_grad = lambda *a, **k: flat_traces.append(1) or flat_fn(*a, **k)
    try:
      print("DP_LOSSES", " ".join(f"{x:.8f}" for x in run_steps(config, num_steps=3)), flush=True)
    finally:
      train_state.flat_reduced_value_and_grad = flat_fn
    print("FLAT_REDUCE_TRACES", len(flat_traces), flush=True)
    print(f"at {time.time() - start:.1f}s", flush=True)

  # Topology-agnostic restore: written by one process on 8 devices (data 2 x fsdp 4), read here onto fsdp=devices.
  parts = build.build_components(config)
  mesh = make_mesh(data=1, fsdp=devices)
  target, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(7), parts.input_shape, mesh,
                                       parts.schedule.num_timesteps)
  # Orbax's manager starts with a barrier, here through the coordination service (use_coordination_barriers): a
  # device collective there would meet gloo's 30 s limit when one process creates its target state much later.
  restored = checkpoint.restore(checkpoint.make_manager(checkpoint_workdir), target)
  expected = np.load(os.path.join(checkpoint_workdir, "leaves.npz"))
  leaves = jax.tree.leaves(restored)
  assert len(leaves) == len(expected.files)
  sharded = sum(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves)
  for i, x in enumerate(leaves):  # each process checks the shards it holds (no collective: nothing to wait for)
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[f"leaf_{i}"][shard.index])
  print("RESTORED", len(leaves), "leaves equal,", sharded, "sharded over", devices, "devices", flush=True)
  print(f"at {time.time() - start:.1f}s", flush=True)
else:
  # The whole job, latent and text-conditional: captions and prompt embeddings go to both processes. The latent
  # scale is computed once and broadcast from process 0: process 1's own estimate is made wrong here on purpose,
  # and each process prints the scale its decoder uses (the test wants process 0's on both).
  from diffusion_jax import latent
  job = tiny_latent_config(data_dir)
  job.text.encoder, job.model.context_dim, job.model.head_channels = "minilm", 384, 8
  job.sample.guidance_scale = 3.0
  if process_id == 1:
    own_scale = latent.latent_scale
    latent.latent_scale = lambda *args, **kwargs: 2.0 * own_scale(*args, **kwargs)
  prepare = latent.prepare_autoencoder

  def prepare_and_print(*args, **kwargs):
    decoder = prepare(*args, **kwargs)
    print("LATENT_SCALE", repr(decoder.scale), flush=True)
    return decoder

  latent.prepare_autoencoder = prepare_and_print
  train.train_and_evaluate(job, workdir)
print(f"DONE at {time.time() - start:.1f}s", flush=True)
