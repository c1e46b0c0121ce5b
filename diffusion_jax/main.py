"""Entry point: `python -m diffusion_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`."""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Drop INFO lines of orbax (it logs every save step) so the progress lines stay readable."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").addFilter(_QuietLibraries())
  import jax
  from diffusion_jax.parallel.multihost import maybe_initialize_distributed
  from diffusion_jax import train
  from diffusion_jax.data import DataNotFoundError
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "jax_cache")))
  maybe_initialize_distributed()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, ImportError, DataNotFoundError, train.NonFiniteLossError) as e:
    # Errors that name the bad value and the fix: print that line, not a traceback (DJ_TRACEBACK=1 shows it).
    if os.environ.get("DJ_TRACEBACK"):
      raise
    sys.exit(f"error: {type(e).__name__}: {e}\n(set DJ_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
  app.run(main)
