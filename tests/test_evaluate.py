"""diffusion_jax.evaluation.evaluate: the metrics file and table, reference statistics, and bits/dim of a
conditional model scored on its null condition."""

import json

import jax
import numpy as np
import pytest

from diffusion_jax import build, train
from diffusion_jax import conditioning as C
from diffusion_jax.evaluation import evaluate as E
from diffusion_jax.parallel.mesh import make_mesh
from helpers import tiny_config, write_fake_fashion_mnist


def test_write_metrics_writes_json_and_prints_the_floor_beside_each_metric(tmp_path, capsys):
  path = E.write_metrics(str(tmp_path), 12, {"fd": 3.5, "floor/fd": 1.25, "num_samples": 8.0})
  assert path == tmp_path / "eval" / "metrics_12.json"
  assert json.loads(path.read_text()) == {"fd": 3.5, "floor/fd": 1.25, "num_samples": 8.0}
  table = capsys.readouterr().out.splitlines()
  assert table[0] == "evaluation at step 12"
  fd_row = next(line for line in table if line.startswith("fd "))
  assert fd_row.split() == ["fd", "3.5000", "1.2500"]
  assert not any(line.startswith("floor/") for line in table)


def test_reference_stats_round_trip_and_bad_files(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3) * 2
  np.savez(tmp_path / "ok.npz", mu=mu, sigma=sigma)
  got_mu, got_sigma = E.load_reference_stats(tmp_path / "ok.npz")
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(2))
  with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D,D\]"):
    E.load_reference_stats(tmp_path / "bad.npz")


def test_bits_per_dim_of_a_class_model_uses_its_null_condition(tmp_path):
  config = tiny_config(write_fake_fashion_mnist(str(tmp_path)))
  config.model.num_classes = 10
  parts = build.build_components(config)
  mesh = make_mesh()
  state, _ = train.create_train_state(parts.model, parts.tx, jax.random.key(0), parts.input_shape, mesh,
                                      parts.schedule.num_timesteps)
  null = C.null_condition(parts.condition)
  out = E.bits_per_dim(config, parts.model, state.params, parts.schedule, mesh, 8, jax.random.key(1), null)
  assert 0 < out["prior_bpd"] < out["total_bpd"] < 100 and out["decoder_bpd"] > 0
  again = E.bits_per_dim(config, parts.model, state.params, parts.schedule, mesh, 8, jax.random.key(1), null)
  assert again == out  # the key decides the noise
  with pytest.raises(ValueError, match="class labels y must be given"):
    E.bits_per_dim(config, parts.model, state.params, parts.schedule, mesh, 8, jax.random.key(1), {})
