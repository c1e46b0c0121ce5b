"""diffusion_jax: diffusion models in JAX/Flax."""
