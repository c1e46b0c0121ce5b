"""Editing math and geometry: RePaint's path and loop, masks, canvases, image conditions, SDEdit's grid, and a
super-resolution model overfit on a fixed batch beating bicubic upsampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import diffusion as D
from diffusion_jax import image_condition as IC
from diffusion_jax.diffusion.inpaint import inpaint_loop, repaint_path
from diffusion_jax.editing.masks import (box_mask, latent_mask, load_mask, outpaint_canvas, parse_box,
                                         seam_score)
from diffusion_jax.editing.tasks import img2img_grid
from diffusion_jax.models import UNet


# ---------------------------------------------------------------- RePaint

def test_repaint_path_without_resampling_walks_straight_down():
  np.testing.assert_array_equal(repaint_path(5), [4, 3, 2, 1, 0, -1])


@pytest.mark.parametrize("num_steps,jump,resample", [(10, 3, 2), (20, 5, 4), (7, 1, 3)])
def test_repaint_path_jumps_back_up_and_resamples(num_steps, jump, resample):
  path = repaint_path(num_steps, jump, resample)
  moves = np.diff(path)
  assert path[0] == num_steps - 1 and path[-1] == -1
  assert set(moves.tolist()) <= {-1, jump}
  jumps = np.sum(moves == jump)
  assert jumps == (resample - 1) * len(range(0, num_steps - jump, jump))
  assert np.sum(moves == -1) == num_steps + jumps * jump  # every jump is walked down again


def test_repaint_path_rejects_bad_settings():
  with pytest.raises(ValueError, match="resample_steps"):
    repaint_path(10, 2, 0)


def _gaussian_problem(dim=4, seed=0):
  """Data x ~ N(0, S) on a dim x dim image with correlated pixels, and its exact eps model: for x_t =
  sqrt(a) x0 + sqrt(1-a) eps, E[eps | x_t] = sqrt(1-a) (a S + (1-a) I)^-1 x_t."""
  n = dim * dim
  coords = np.stack(np.meshgrid(np.arange(dim), np.arange(dim), indexing="ij"), -1).reshape(n, 2)
  cov = np.exp(-np.sum((coords[:, None] - coords[None]) ** 2, -1) / 4.0) + 1e-3 * np.eye(n)
  schedule = D.make_schedule(D.get_beta_schedule("linear", 100))

  def model_fn(x, t):
    a = schedule.alphas_cumprod[t][:, None, None]
    precision = jnp.linalg.inv(a * jnp.asarray(cov, jnp.float32) + (1 - a) * jnp.eye(n))
    eps = jnp.sqrt(1 - a)[..., 0] * jnp.einsum("bij,bj->bi", precision, x.reshape(len(x), n))
    return eps.reshape(x.shape)

  return schedule, model_fn, cov


def test_inpainting_keeps_the_known_region_and_fills_the_hole_with_the_conditional_law():
  dim, batch = 4, 1024
  schedule, model_fn, cov = _gaussian_problem(dim)
  x_known = np.asarray(np.linalg.cholesky(cov) @ np.random.default_rng(1).normal(size=dim * dim), np.float32)
  hole = box_mask(dim, dim, (1, 1, 3, 3)).reshape(-1) > 0
  # The exact conditional law of the hole given the known pixels (Gaussian conditioning).
  k, h = ~hole, hole
  cond_mean = cov[np.ix_(h, k)] @ np.linalg.solve(cov[np.ix_(k, k)], x_known[k])
  errors = {}
  for resample in (1, 10):
    x0 = jnp.broadcast_to(jnp.asarray(x_known).reshape(1, dim, dim, 1), (batch, dim, dim, 1))
    keep = jnp.asarray(1.0 - box_mask(dim, dim, (1, 1, 3, 3)))[None]
    out = inpaint_loop(schedule, model_fn, x0, keep, jax.random.key(0), path=repaint_path(100, 10, resample),
                       clip_denoised=False)
    out = np.asarray(out).reshape(batch, -1)
    np.testing.assert_array_equal(out[:, k], np.broadcast_to(x_known[k], (batch, k.sum())))  # exactly kept
    errors[resample] = np.abs(out[:, h].mean(0) - cond_mean).max()
  # Resampling harmonizes the hole with the known pixels: its mean approaches the exact conditional mean.
  # Measured: max error 0.41 without resampling, 0.15 with 10 (0.11 with 20); sampling error ~0.01.
  assert errors[10] < 0.2 and errors[10] < 0.5 * errors[1], errors


def test_inpaint_loop_checks_its_path():
  schedule, model_fn, _ = _gaussian_problem(2)
  with pytest.raises(ValueError, match="path must start"):
    inpaint_loop(schedule, model_fn, jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1)), jax.random.key(0),
                 path=np.asarray([5, 4, -1]))


# ---------------------------------------------------------------- masks and canvases

def test_parse_box_defaults_to_the_centre_and_names_bad_boxes():
  assert parse_box("", 28, 28) == (7, 7, 21, 21)
  assert parse_box("2,3,10,12", 28, 28) == (2, 3, 10, 12)
  for bad, match in (("1,2,3", "four integers"), ("0,0,0,5", "non-empty"), ("0,0,29,5", "inside"),
                     ("a,b,c,d", "four integers"), ("-1,0,4,4", "inside")):
    with pytest.raises(ValueError, match=f"config.edit.box=.*{match}"):
      parse_box(bad, 28, 28)


def test_box_mask_marks_the_box():
  mask = box_mask(6, 5, (1, 2, 3, 5))
  assert mask.shape == (6, 5, 1) and mask.sum() == 2 * 3 and mask[1, 2, 0] == 1 and mask[0, 0, 0] == 0


def test_load_mask_reads_white_as_regenerate_and_rejects_bad_files(tmp_path):
  pixels = np.zeros((8, 8), np.uint8)
  pixels[2:4, 2:6] = 255
  Image.fromarray(pixels).save(tmp_path / "m.png")
  mask = load_mask(str(tmp_path / "m.png"), 8, 8)
  assert mask.shape == (8, 8, 1) and mask.sum() == 8
  Image.fromarray(pixels).save(tmp_path / "rgb.png")  # any channels are read as luminance
  cases = {"small.png": (np.zeros((4, 4), np.uint8) + 255, "is 4x4, the images are 8x8"),
           "gray.png": (np.full((8, 8), 100, np.uint8), "must be binary"),
           "black.png": (np.zeros((8, 8), np.uint8), "all black")}
  for name, (array, match) in cases.items():
    Image.fromarray(array).save(tmp_path / name)
    with pytest.raises(ValueError, match=match):
      load_mask(str(tmp_path / name), 8, 8)
  with pytest.raises(ValueError, match="does not exist"):
    load_mask(str(tmp_path / "missing.png"), 8, 8)
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(ValueError, match="does not decode"):
    load_mask(str(tmp_path / "text.png"), 8, 8)


@pytest.mark.parametrize("side,shape,inside", [("left", (6, 9), (0, 3)), ("right", (6, 9), (0, 0)),
                                               ("top", (9, 6), (3, 0)), ("bottom", (9, 6), (0, 0)),
                                               ("all", (12, 12), (3, 3))])
def test_outpaint_canvas_places_the_image_and_masks_the_rest(side, shape, inside):
  images = np.arange(2 * 6 * 6 * 3, dtype=np.uint8).reshape(2, 6, 6, 3)
  canvas, mask = outpaint_canvas(images, 3, side)
  assert canvas.shape == (2, *shape, 3) and mask.shape == (*shape, 1)
  top, left = inside
  np.testing.assert_array_equal(canvas[:, top:top + 6, left:left + 6], images)
  assert mask[top:top + 6, left:left + 6].sum() == 0 and mask.sum() == shape[0] * shape[1] - 36


def test_latent_mask_regenerates_every_cell_that_touches_the_hole():
  mask = box_mask(8, 8, (3, 3, 5, 4))  # rows 3-4, column 3
  small = latent_mask(mask, 4)
  assert small.shape == (2, 2, 1)
  np.testing.assert_array_equal(small[..., 0], [[1, 0], [1, 0]])
  np.testing.assert_array_equal(latent_mask(mask[None], 2).shape, (1, 4, 4, 1))


def test_seam_score_sees_a_step_at_the_border():
  rng = np.random.default_rng(0)
  smooth = rng.normal(size=(4, 12, 12, 1))
  _, mask = outpaint_canvas(np.zeros((1, 6, 6, 1), np.uint8), 3, "all")
  stepped = smooth + 10.0 * mask[None]
  assert 0.8 < seam_score(smooth, mask) < 1.2
  assert seam_score(stepped, mask) > 5


# ---------------------------------------------------------------- SDEdit's grid

def test_img2img_grid_takes_the_tail_of_the_grid():
  grid = np.arange(49, -1, -1)
  np.testing.assert_array_equal(img2img_grid(grid, 1.0, "ddim"), grid)
  np.testing.assert_array_equal(img2img_grid(grid, 0.2, "ddim"), np.arange(9, -1, -1))
  np.testing.assert_array_equal(img2img_grid(grid, 1e-3, "ddim"), [0])
  np.testing.assert_array_equal(img2img_grid(grid, 1e-3, "ddpm"), [1, 0])  # an ancestral step needs two


def test_sample_loop_from_a_noised_input_at_small_t_returns_nearly_the_input():
  schedule = D.make_schedule(D.get_beta_schedule("linear", 100))
  x0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  # A perfect eps model for this one x0: eps = (x_t - sqrt(a) x0) / sqrt(1 - a).
  model_fn = lambda x, t: (x - schedule.sqrt_alphas_cumprod[t][:, None, None, None] * x0) / (
      schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None])
  for sampler in ("ddim", "ddpm", "dpmpp_2m", "euler"):
    grid = img2img_grid(D.timestep_grid(schedule, 20, "uniform"), 0.5, sampler)
    x_t = D.q_sample(schedule, x0, jnp.full((2,), grid[0], jnp.int32), noise)
    out = D.sample_loop(schedule, model_fn, x_t, jax.random.key(2), grid, sampler=sampler)
    np.testing.assert_allclose(out, x0, atol=2e-3, err_msg=sampler)


# ---------------------------------------------------------------- the U-Net on other canvases

def test_unet_for_size_keeps_parameters_and_attention_levels():
  model = UNet(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), out_channels=1)
  wide = model.for_size(28, 36)
  assert tuple(wide.attn_resolutions) == (9,)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
  wide_params = jax.eval_shape(wide.init, jax.random.key(0), jnp.zeros((1, 36, 36, 1)), jnp.zeros((1,), jnp.int32))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, wide_params)
  out = jax.jit(model.apply)(params, jnp.ones((2, 28, 40, 1)), jnp.zeros((2,), jnp.int32))  # non-square: same height
  assert out.shape == (2, 28, 40, 1)
  out = jax.jit(wide.apply)(params, jnp.ones((1, 36, 36, 1)), jnp.zeros((1,), jnp.int32))
  assert out.shape == (1, 36, 36, 1) and np.isfinite(np.asarray(out)).all()


# ---------------------------------------------------------------- image conditions

def test_image_conditions_shapes_and_values():
  images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 3), minval=-1, maxval=1)
  low = IC.downsample(images, 7)
  assert low.shape == (16, 7, 7, 3)
  # A low-pass filter: constant images stay constant, the mean is kept, the detail is gone.
  np.testing.assert_allclose(IC.downsample(jnp.full((1, 28, 28, 3), 0.3), 7), 0.3, atol=1e-5)
  np.testing.assert_allclose(low.mean(), images.mean(), atol=0.02)
  assert float(low.std()) < 0.5 * float(images.std())
  assert IC.train_concat(IC.ImageConditionSpec("low_res", 7), jax.random.key(1), images).shape == (16, 28, 28, 3)
  masks = IC.random_masks(jax.random.key(2), 256, 28, 28)
  assert masks.shape == (256, 28, 28, 1) and set(np.unique(masks).tolist()) <= {0.0, 1.0}
  coverage = np.asarray(masks).mean((1, 2, 3))
  assert 0.05 < np.median(coverage) < 0.7 and (coverage == 1).mean() > 0.03 and coverage.min() > 0
  concat = IC.train_concat(IC.ImageConditionSpec("masked"), jax.random.key(2), images)
  assert concat.shape == (16, 28, 28, 4)
  hole = np.asarray(concat[..., 3:]) > 0.5
  assert np.all(np.asarray(concat[..., :3])[np.broadcast_to(hole, (16, 28, 28, 3))] == 0)


def test_a_super_resolution_model_overfit_on_a_fixed_batch_beats_bicubic():
  """SR3's model on 8 fixed 16x16 images (blocky shapes), 4x4 -> 16x16: after a short fit its samples are
  closer to the originals than bicubic upsampling of the same low-resolution inputs. x0-prediction: an eps model
  needs ~10x the steps for the same samples (measured: eps after 400 steps was still worse than bicubic)."""
  import optax
  from diffusion_jax import build
  from diffusion_jax.config import get_base_config
  config = get_base_config()
  config.data.image_size, config.data.channels = 16, 1
  config.diffusion.num_timesteps, config.diffusion.schedule = 100, "cosine"
  config.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  import ml_collections
  config.image_condition = ml_collections.ConfigDict(dict(kind="low_res", low_res_size=4))
  model, schedule = build.build_unet(config), build.build_schedule(build.DiffusionSettings(schedule="cosine",
                                                                                         num_timesteps=100))
  rng = np.random.default_rng(0)
  images = np.full((8, 16, 16, 1), -1.0, np.float32)
  for i in range(8):
    y, x, s = rng.integers(0, 8), rng.integers(0, 8), rng.integers(4, 9)
    images[i, y:y + s, x:x + s] = 1.0
  images = jnp.asarray(images)
  low = IC.downsample(images, 4)
  concat = IC.low_res_condition(low, 16)
  params = model.init(jax.random.key(0), images[:1], jnp.zeros((1,), jnp.int32), concat=concat[:1])
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k1, k2 = jax.random.split(key)
    t = jax.random.randint(k1, (8,), 0, 100)
    noise = jax.random.normal(k2, images.shape)
    loss = lambda p: jnp.mean((model.apply(p, D.q_sample(schedule, images, t, noise), t, concat=concat) - images) ** 2)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(200):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  samples = D.sample(schedule, lambda x, t: model.apply(params, x, t, concat=concat), images.shape,
                     jax.random.key(7), sampler="ddim", num_steps=25, prediction="x0")
  bicubic = jax.image.resize(low, images.shape, "bicubic")
  mse = lambda a: float(jnp.mean((jnp.clip(a, -1, 1) - images) ** 2))
  assert mse(samples) < 0.5 * mse(bicubic), (mse(samples), mse(bicubic))  # measured: 0.0005 vs 0.17 at 300 steps
