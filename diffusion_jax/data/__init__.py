"""Input pipelines: in-memory datasets, image folders and tfds datasets streamed with grain."""

from diffusion_jax.data.datasets import (IMAGE_FOLDER, IN_MEMORY, DatasetInfo, dataset_info, is_streamed,
                                         make_batches, real_images)
from diffusion_jax.data.pipeline import (DATASETS, IMAGE_SHAPES, DataNotFoundError, InMemoryBatches, dataset_image_shape,
                                         load_split, scale_images)
