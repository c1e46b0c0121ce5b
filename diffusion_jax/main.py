"""Entry point: `python -m diffusion_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`.

A user error (a bad config file, override, workdir, DJ_* variable or input) prints one `error:` line and exits
1 (DJ_TRACEBACK=1 shows the traceback); SIGTERM / Ctrl-C during training save the step reached and exit 143 / 130.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax.config import ConfigError, parse_config_flags  # noqa: E402
from diffusion_jax.environment import read_environment  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Drop INFO lines of orbax (it logs every save step) and jax's backend probing, so progress stays readable."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(s in record.pathname for s in ("/orbax/", "xla_bridge"))


def _fail(message: str, code: int = 1):
  sys.stderr.write(f"error: {message}\n")
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return parse_config_flags(FLAGS, argv)
  except ConfigError as e:
    _fail(str(e))


def _split_host_devices(env, config) -> None:
  """XLA:CPU devices for this host (DJ_CPU_DEVICES, or auto for a single-process run) before JAX starts: a
  data-parallel split keeps more cores busy (parallel.mesh.auto_host_devices). Accelerators are unaffected."""
  from diffusion_jax.parallel.mesh import auto_host_devices_for_config, split_host_devices
  count = env.cpu_devices
  if count is None:
    if env.coordinator_address or env.auto_distributed:
      return  # each process of a multi-process job keeps XLA's default unless DJ_CPU_DEVICES says otherwise
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = auto_host_devices_for_config(config, cores)
  split_host_devices(count)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: give settings as --config.key=value (e.g. --config.model.ch=64)")
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    env = read_environment()
  except ValueError as e:
    _fail(str(e))
  _split_host_devices(env, FLAGS.config)
  from diffusion_jax import host_memory
  # Before any work and before JAX starts: glibc reads its tunables, the loader LD_PRELOAD, only at a process's start.
  host_memory.reexec_with_host_memory()
  host_memory.reuse_freed_heap()  # before JAX's CPU client exists: XLA:CPU's step buffers reused, not mapped afresh
  import jax
  from diffusion_jax import train
  from diffusion_jax.data import DataNotFoundError
  from diffusion_jax.loop import TrainingInterrupted
  from diffusion_jax.models import native
  from diffusion_jax.parallel.multihost import maybe_initialize_distributed
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "jax_cache")))
  native.keep_compilation_cache_hits()
  try:
    maybe_initialize_distributed(env)
    if jax.process_index() > 0:  # one log for the job: process 0's (the others still print warnings and errors)
      absl_logging.set_verbosity(absl_logging.WARNING)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except TrainingInterrupted as e:
    sys.stderr.write(f"{e}\n")
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # outside the training loop (compiling, sampling, evaluating): nothing unsaved
    _fail("interrupted (Ctrl-C); every finished checkpoint is kept: rerun the same command to resume", 130)
  except (ValueError, FileNotFoundError, ImportError, TimeoutError, DataNotFoundError,
          train.NonFiniteLossError) as e:
    # Errors that name the bad value and the fix: print that line, not a traceback (DJ_TRACEBACK=1 shows it).
    if env.traceback:
      raise
    _fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
