"""Evaluate a checkpoint: sample quality in the offline classifier's space with its real-data floor,
and bits/dim on the test split (the VLB loop of IDDPM)."""

from __future__ import annotations

import json
import zipfile
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath

from diffusion_jax import diffusion as D
from diffusion_jax.data import is_streamed, real_images, scale_images
from diffusion_jax.evaluation.classifier import weights_path
from diffusion_jax.parallel.mesh import batch_sharding, global_to_host

OFFLINE_DATASETS = ("fashion_mnist", "mnist")


def sample_quality(config, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
  """fd/kid/is in the offline classifier space for `images`, and the same for N real train images (floor)."""
  from diffusion_jax.evaluation.offline import OfflineEvaluator
  dataset = config.data.dataset
  if dataset not in OFFLINE_DATASETS or not os.path.exists(weights_path(dataset)):
    logging.warning("no offline feature network for %r: sample-quality metrics skipped", dataset)
    return {}
  if images.shape[1:] != (28, 28, 1):
    logging.warning("the offline feature network takes 28x28x1 images, these are %s: sample-quality metrics "
                    "skipped", images.shape[1:])
    return {}
  evaluator = OfflineEvaluator(dataset, real_images(config.data, "test"))
  real = real_images(config.data, "train", len(images))
  out = evaluator(images, labels)
  out.update({f"floor/{k}": v for k, v in evaluator(real).items()})
  return out


def load_reference_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D,D]) from an .npz with pytorch-fid's keys `mu` and `sigma`."""
  try:
    with epath.Path(path).open("rb") as fh, np.load(fh) as f:  # through epath: a gs:// workdir's cached stats too
      mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a statistics file with keys 'mu' and 'sigma' ({type(e).__name__}: {e})") from None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu must be [D] and sigma [D,D], got {mu.shape} and {sigma.shape}")
  return mu, sigma


def fid(config, images: np.ndarray, workdir: str) -> dict[str, float]:
  """FID with pytorch-fid's Inception-v3 against the test split's statistics (cached as mu/sigma .npz)."""
  from diffusion_jax.evaluation import inception
  from diffusion_jax.evaluation.metrics import feature_statistics, frechet_distance
  try:
    variables = inception.load_inception_variables(config.eval.inception_weights,
                                                   download=config.eval.download_inception)
  except FileNotFoundError as e:
    logging.warning("FID skipped: %s", e)
    return {}
  features = inception.make_inception_fn(variables)
  stats_path = epath.Path(config.eval.fid_reference_stats or
                          epath.Path(workdir) / "eval" / f"fid_stats_{config.data.dataset}_test.npz")
  if stats_path.exists():
    mu_ref, sigma_ref = load_reference_stats(stats_path)
  else:
    # The test split (streamed datasets: up to 50k of it; an image folder: its images).
    mu_ref, sigma_ref = feature_statistics(features(real_images(config.data, "test", 50_000)))
    if jax.process_index() == 0:  # every process computed the same statistics; one writes them
      stats_path.parent.mkdir(parents=True, exist_ok=True)
      with stats_path.open("wb") as f:
        np.savez(f, mu=mu_ref, sigma=sigma_ref)
  fake_feats = features(images)
  out = {"fid": frechet_distance(*feature_statistics(fake_feats), mu_ref, sigma_ref)}
  real = real_images(config.data, "train", len(images))
  out["floor/fid"] = frechet_distance(*feature_statistics(features(real)), mu_ref, sigma_ref)
  return out


def bits_per_dim(config, model, params, schedule: D.Schedule, mesh, num_images: int, key: jax.Array,
                 null_cond: dict | None = None) -> dict[str, float]:
  """Mean total / prior / decoder bits per dim over `num_images` test images (IDDPM calc_bpd_loop); batch i
  draws with fold_in(key, i). A conditional model is scored on its null condition (leading [1]): the bound
  on p(x)."""
  images = real_images(config.data, "test", None if not is_streamed(config.data) else num_images)
  n = jax.device_count()
  batch = max(n, -(-min(config.eval.bpd_batch_size, num_images) // n) * n)
  sharding = batch_sharding(mesh)
  d = config.diffusion

  @jax.jit
  def bpd(params, x, key):
    cond = jax.tree.map(lambda a: jnp.broadcast_to(a, (x.shape[0], *a.shape[1:])), null_cond or {})
    model_fn = lambda x_t, t: model.apply(params, jax.lax.with_sharding_constraint(x_t, sharding), t, **cond)
    out = D.calc_bpd_loop(schedule, model_fn, x, key, prediction=d.prediction, variance=d.variance)
    return {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"], "decoder_bpd": out["vb"][:, 0]}

  results = []
  for i in tqdm.trange(-(-num_images // batch), desc="bits/dim", unit="batch", disable=jax.process_index() > 0):
    x = scale_images(images[i * batch:(i + 1) * batch])
    if len(x) < batch:  # pad the last batch; padded rows are dropped below
      x = np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)])
    out = bpd(params, jax.device_put(jnp.asarray(x), sharding), jax.random.fold_in(key, i))
    results.append({k: global_to_host(v) for k, v in out.items()})
  return {k: float(np.concatenate([r[k] for r in results])[:num_images].mean()) for k in results[0]}


def write_metrics(workdir, step: int, metrics: dict[str, float], writer=None) -> epath.Path:
  """DIR/eval/metrics_<step>.json, TensorBoard scalars, and a printed table with the floor beside each metric."""
  directory = epath.Path(workdir) / "eval"
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"metrics_{step}.json"
  path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
  if writer is not None:
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  lines = [f"evaluation at step {step}", f"{'metric':<28}{'model':>12}{'real data floor':>18}"]
  for k, v in sorted(metrics.items()):
    if not k.startswith("floor/"):
      floor = metrics.get(f"floor/{k}")
      lines.append(f"{k:<28}{v:>12.4f}{'' if floor is None else f'{floor:>18.4f}'}")
  print("\n".join(lines), flush=True)
  return path


def evaluate(config, workdir, *, step: int, model, params, schedule, mesh, images: np.ndarray,
             labels: np.ndarray | None = None, writer=None, key: jax.Array, null_cond: dict | None = None
             ) -> dict[str, float]:
  """All metrics for one checkpoint; `images` are its samples (uint8 [N,H,W,C]); `key` and `null_cond`
  (conditioning.null_condition) serve the bits/dim bound."""
  t0 = time.time()
  metrics = sample_quality(config, images, labels)
  if config.eval.fid:
    metrics.update(fid(config, images, workdir))
  if config.eval.bpd_num_images > 0:
    metrics.update(bits_per_dim(config, model, params, schedule, mesh, config.eval.bpd_num_images, key,
                                null_cond))
  metrics["num_samples"] = float(len(images))
  if jax.process_index() == 0:
    write_metrics(workdir, step, metrics, writer)
  logging.info("evaluation took %.1fs", time.time() - t0)
  return metrics
