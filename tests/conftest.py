"""Test setup: 8 fake CPU devices and the persistent compilation cache, before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocess runs of `diffusion_jax.main` (which drop XLA_FLAGS) train tiny models: one XLA:CPU device compiles and
# runs them fastest; tests about the host split set DJ_CPU_DEVICES themselves (test_edit_cli, test_bad_inputs).
os.environ.setdefault("DJ_CPU_DEVICES", "1")

import jax  # noqa: E402

# The persistent compilation cache, shared with the subprocesses tests start (main and the multi-process workers
# read the same variable).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
from diffusion_jax.models import native  # noqa: E402

native.keep_compilation_cache_hits()  # as main does: multi-device programs with the native kernels hit the cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
