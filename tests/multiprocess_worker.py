"""One process of a 2-process CPU job (run by test_multiprocess.py): 2 local devices each, gloo collectives."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, data_dir, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from helpers import tiny_config, tiny_text_config  # noqa: E402
from steps import run_steps  # noqa: E402

from diffusion_jax import train  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
config = tiny_config(data_dir)
losses = run_steps(config, num_steps=3)
print("LOSSES", " ".join(f"{x:.8f}" for x in losses), flush=True)
config.mesh.fsdp = 4  # FSDP across both processes: each large parameter split over all 4 devices
print("FSDP_LOSSES", " ".join(f"{x:.8f}" for x in run_steps(config, num_steps=3)), flush=True)
# The whole job, text-conditional: the caption table and prompt embeddings are replicated to both processes.
train.train_and_evaluate(tiny_text_config(data_dir), workdir)
print("DONE", flush=True)
