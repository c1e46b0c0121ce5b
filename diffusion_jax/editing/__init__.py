"""Editing with a trained model (mode=edit): inpainting, outpainting, image-to-image and super-resolution."""

from diffusion_jax.editing.inputs import TASKS, check_edit, load_edit_images, parse_images
from diffusion_jax.editing.tasks import EditResult, run_edit, write_edits
