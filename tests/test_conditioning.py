"""diffusion_jax.conditioning (class and text conditions, prompts and labels) and conditional runs end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import conditioning as C
from diffusion_jax import diffusion as D
from diffusion_jax import train
from diffusion_jax.models import UNet
from helpers import tiny_config, tiny_text_config, write_fake_fashion_mnist


def test_class_embedding_changes_the_output_and_labels_are_required():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=10)
  x, t = jnp.ones((2, 8, 8, 1)), jnp.array([5, 5])
  params = model.init(jax.random.key(0), x, t, jnp.array([0, 0]))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  a, b = model.apply(params, x, t, jnp.array([0, 0])), model.apply(params, x, t, jnp.array([3, 10]))
  assert float(jnp.abs(a[1] - b[1]).max()) > 0 and float(jnp.abs(a[0] - b[0]).max()) > 0
  np.testing.assert_array_equal(a[0], a[1])
  with pytest.raises(ValueError, match="class labels y must be given exactly when num_classes > 0"):
    model.apply(params, x, t)


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
  calls = []

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    return x * (1.0 + y[:, None, None, None].astype(jnp.float32))

  x, t, y = jnp.ones((3, 2, 2, 1)), jnp.zeros((3,), jnp.int32), jnp.array([1, 2, 3])
  null = jnp.full_like(y, 9)
  np.testing.assert_array_equal(D.guided_model_fn(model_fn, y, null, 1.0)(x, t), model_fn(x, t, y))
  calls.clear()
  np.testing.assert_allclose(D.guided_model_fn(model_fn, y, null, 0.0)(x, t), 10.0 * x)  # null label 9
  assert calls == [6]  # conditional and unconditional in one batched call
  w = 3.0
  expected = 10.0 * x + w * (model_fn(x, t, y) - 10.0 * x)
  np.testing.assert_allclose(D.guided_model_fn(model_fn, y, null, w)(x, t), expected, rtol=1e-6)
  # A learned variance: only the prediction channels are guided.
  two = lambda x, t, y: jnp.concatenate([model_fn(x, t, y), model_fn(x, t, y)], -1)
  out = D.guided_model_fn(two, y, null, w, guided_channels=1)(x, t)
  np.testing.assert_allclose(out[..., :1], expected, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1:], model_fn(x, t, y), rtol=1e-6)
  for bad in (-1.0, "strong", True):
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
      D.guided_model_fn(model_fn, y, null, bad)


def test_condition_dropout_rate():
  labels = jnp.zeros((20000,), jnp.int32)
  dropped = D.drop_labels(jax.random.key(0), labels, 0.1, 10)
  rate = float(jnp.mean(dropped == 10))
  assert abs(rate - 0.1) < 0.01 and set(np.unique(np.asarray(dropped))) == {0, 10}


def test_class_conditional_run_writes_labelled_samples(tmp_path):
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  config = tiny_config(data_dir)
  config.model.num_classes = 10
  config.sample.guidance_scale = 2.0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert out["images"].shape == (10, 16, 16, 1)
  np.testing.assert_array_equal(out["labels"], np.arange(10))
  config.mode, config.sample.class_labels, config.sample.num_images = "sample", "3", 4
  train.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "samples", "samples.npz"))["labels"], [3, 3, 3, 3])
  config.sample.class_labels = "0,9,2,2"
  train.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "samples", "samples.npz"))["labels"], [0, 9, 2, 2])


# ---------------------------------------------------------------- text conditioning

def test_cross_attention_reads_the_context_and_respects_its_mask():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), context_dim=6, pooled_context=False)
  x, t = jnp.ones((2, 8, 8, 1)), jnp.array([5, 5])
  ctx = jax.random.normal(jax.random.key(0), (2, 3, 6))
  mask = jnp.array([[1, 1, 0], [1, 1, 0]])
  params = model.init(jax.random.key(0), x, t, context=ctx, context_mask=mask)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  out = model.apply(params, x, t, context=ctx, context_mask=mask)
  assert out.shape == (2, 8, 8, 1)
  other = ctx.at[1, :2].set(jax.random.normal(jax.random.key(2), (2, 6)))
  changed = model.apply(params, x, t, context=other, context_mask=mask)
  np.testing.assert_allclose(changed[0], out[0], atol=1e-6)
  assert float(jnp.abs(changed[1] - out[1]).max()) > 1e-4
  padded = ctx.at[:, 2].set(100.0)  # a masked (padding) token changes nothing
  np.testing.assert_allclose(model.apply(params, x, t, context=padded, context_mask=mask), out, atol=1e-6)
  with pytest.raises(ValueError, match=r"a context \[B,L,6\] must be given exactly when context_dim > 0"):
    model.apply(params, x, t)
  with pytest.raises(ValueError, match=r"a context \[B,L,6\]"):
    model.apply(params, x, t, context=ctx[..., :4], context_mask=mask)


def test_concat_conditioning_adds_input_channels():
  model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), concat_channels=2)
  x, t = jnp.ones((1, 8, 8, 1)), jnp.array([3])
  params = model.init(jax.random.key(0), x, t, concat=jnp.zeros((1, 8, 8, 2)))
  assert params["params"]["Conv_0"]["kernel"].shape[-2] == 3
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  a = model.apply(params, x, t, concat=jnp.zeros((1, 8, 8, 2)))
  b = model.apply(params, x, t, concat=jnp.ones((1, 8, 8, 2)))
  assert a.shape == (1, 8, 8, 1) and float(jnp.abs(a - b).max()) > 0
  with pytest.raises(ValueError, match="must be given exactly when concat_channels > 0"):
    model.apply(params, x, t)


def test_caption_table_and_text_condition_dropout():
  from diffusion_jax.models.text_encoders import load_text_encoder
  captions = C.CAPTIONS["fashion_mnist"]
  table = C.build_text_table(load_text_encoder("minilm", max_length=16), captions)
  assert table.context.shape == (1 + sum(map(len, captions)), 16, 384) and int(table.mask[0].sum()) == 2  # ""
  labels = jnp.asarray(np.arange(20000) % 10, jnp.int32)
  spec = C.ConditionSpec("text", p_uncond=0.1, captions=captions)
  cond = jax.jit(lambda k: C.train_condition(spec, k, {"label": labels}, table))(jax.random.key(0))
  rows = np.asarray([_row_of(table, c) for c in np.asarray(cond["context"][:2000, :4, 0])])
  null = np.mean(rows == 0)
  assert abs(null - 0.1) < 0.02
  drawn = rows[rows > 0]
  owner = np.repeat(np.arange(10), [len(c) for c in captions])
  np.testing.assert_array_equal(owner[drawn - 1], np.asarray(labels[:2000])[rows > 0])  # a caption of its class
  assert len(np.unique(drawn)) == sum(map(len, captions))  # every template gets drawn


def _row_of(table, context_prefix):
  return int(np.argmin(np.abs(np.asarray(table.context[:, :4, 0]) - context_prefix).sum(-1)))


def test_text_conditional_run_writes_prompted_samples_and_a_captioned_grid(tmp_path):
  data_dir = write_fake_fashion_mnist(str(tmp_path))
  config = tiny_text_config(data_dir)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert out["images"].shape == (10, 16, 16, 1)
  np.testing.assert_array_equal(out["labels"], np.arange(10))
  assert out["prompts"][7] == "a photo of a sneaker"
  from PIL import Image
  from diffusion_jax.images import captioned_grid
  png = np.asarray(Image.open(os.path.join(workdir, "samples", "samples.png")))
  want = captioned_grid(out["images"], out["prompts"])
  np.testing.assert_array_equal(png.reshape(want.shape), want)
  config.mode, config.sample.num_images = "sample", 4
  config.sample.prompt = "some blue jeans | a photo of a bag | x | y"
  train.train_and_evaluate(config, workdir)
  out = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert list(out["prompts"]) == ["some blue jeans", "a photo of a bag", "x", "y"]
  np.testing.assert_array_equal(out["labels"], [-1, 8, -1, -1])
  config.sample.prompt, config.sample.class_labels = "", "7"
  train.train_and_evaluate(config, workdir)
  out = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert list(out["prompts"]) == ["a photo of a sneaker"] * 4 and list(out["labels"]) == [7] * 4


def test_prompts_and_labels_to_sample():
  captions = C.CAPTIONS["fashion_mnist"]
  text = C.ConditionSpec("text", captions=captions)
  labels, prompts = C.sample_prompts_and_labels(text, 3)  # nothing given: every class in turn, first caption
  assert list(labels) == [0, 1, 2] and list(prompts) == [c[0] for c in captions[:3]]
  labels, prompts = C.sample_prompts_and_labels(text, 2, prompt="a pair of trousers | moon boots")
  assert list(labels) == [1, -1] and list(prompts) == ["a pair of trousers", "moon boots"]
  labels, prompts = C.sample_prompts_and_labels(text, 3, class_labels="9")
  assert list(labels) == [9, 9, 9] and set(prompts) == {captions[9][0]}
  classes = C.ConditionSpec("class", num_classes=4)
  labels, prompts = C.sample_prompts_and_labels(classes, 6)
  assert list(labels) == [0, 1, 2, 3, 0, 1] and prompts is None
  assert C.sample_prompts_and_labels(C.ConditionSpec(), 5) == (None, None)
  with pytest.raises(ValueError, match=r"class_labels='4' is invalid: \[4\] out of range \[0, 4\)"):
    C.sample_prompts_and_labels(classes, 2, class_labels="4")


def test_null_condition_is_the_null_class_and_the_empty_prompt():
  np.testing.assert_array_equal(C.null_condition(C.ConditionSpec("class", num_classes=10))["y"], [10])
  assert C.null_condition(C.ConditionSpec()) == {}
  cond, null = C.sample_condition(C.ConditionSpec("class", num_classes=10), np.array([1, 2, 3]), None)
  np.testing.assert_array_equal(cond["y"], [1, 2, 3])
  np.testing.assert_array_equal(null["y"], [10, 10, 10])
