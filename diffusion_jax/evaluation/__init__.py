"""Sample-quality metrics."""

from diffusion_jax.evaluation.metrics import feature_statistics, frechet_distance, kid, precision_recall
