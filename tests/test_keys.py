"""diffusion_jax.keys: one split of the root seed, one key per purpose."""

import dataclasses

import jax
import numpy as np

from diffusion_jax.keys import RunKeys, data_seed


def test_every_purpose_has_its_own_key_and_the_seed_decides_them():
  keys = RunKeys.from_seed(0)
  data = [np.asarray(jax.random.key_data(getattr(keys, f.name))) for f in dataclasses.fields(RunKeys)]
  assert len({d.tobytes() for d in data}) == len(data)  # no two purposes share a key
  split = jax.random.split(jax.random.key(0), len(data))  # exactly one split of the root key, in field order
  for got, want in zip(data, split):
    np.testing.assert_array_equal(got, jax.random.key_data(want))
  again, other = RunKeys.from_seed(0), RunKeys.from_seed(1)
  np.testing.assert_array_equal(jax.random.key_data(again.train), jax.random.key_data(keys.train))
  assert not np.array_equal(jax.random.key_data(other.train), jax.random.key_data(keys.train))


def test_data_seeds_differ_per_stage():
  assert data_seed(5, "diffusion") != data_seed(5, "autoencoder")


def test_a_purpose_added_last_leaves_the_earlier_keys_unchanged():
  root = jax.random.key(3)
  n = len(dataclasses.fields(RunKeys))
  keys = RunKeys.from_seed(3)
  earlier = jax.random.split(root, n - 1)  # the keys before the newest purpose (edit) was added
  for i, field in enumerate(dataclasses.fields(RunKeys)[:-1]):
    np.testing.assert_array_equal(jax.random.key_data(getattr(keys, field.name)), jax.random.key_data(earlier[i]))
