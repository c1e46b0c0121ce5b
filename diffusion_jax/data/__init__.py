"""Input pipelines."""

from diffusion_jax.data.pipeline import (DATASETS, IMAGE_SHAPES, DataNotFoundError, InMemoryBatches, dataset_image_shape,
                                         load_split, scale_images)
