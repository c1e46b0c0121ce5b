"""A dedicated inpainting model (as Stable Diffusion's inpainting U-Net, LDM sec. 4.5): the masked image and the
mask are concatenated to x_t, and training draws random holes (boxes, strokes, a few fully masked images;
image_condition.random_masks). The same U-Net and schedule as configs/fashion_mnist.py, so it compares directly
with training-free inpainting (RePaint) on that model (bench/editing.py). Inpaint or outpaint with
`--config.mode=edit --config.edit.task=inpaint|outpaint`. Variants: 'cpu' (default) and 'full', as
fashion_mnist.py's."""

import os

import ml_collections

from diffusion_jax.config import load_config_file


def get_config(variant: str = "cpu"):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"), variant)
  config.image_condition = ml_collections.ConfigDict(dict(kind="masked", low_res_size=0))
  # v-prediction (Salimans & Ho 2022): with eps-prediction on the cosine schedule (alpha_bar_T ~ 0) the model's x0
  # at high noise is ill-conditioned, so sampling drifts from the known pixels before it can follow them (measured:
  # with nothing masked, an eps model's samples missed the input by MSE 0.42; bench/editing.py).
  config.diffusion.prediction = "v"
  config.eval.bpd_num_images = 0
  config.sample.sampler = "ddim"
  config.sample.num_steps = 50
  return config
