"""Networks: the U-Net and its layers."""

from diffusion_jax.models.unet import UNet
