"""Input pipelines."""

from diffusion_jax.data.pipeline import DATASETS, DataNotFoundError, InMemoryBatches, load_split, scale_images
