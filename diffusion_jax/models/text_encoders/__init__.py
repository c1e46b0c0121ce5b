"""The pretrained text encoders by name: one small file per encoder, each with
`load(model_dir, max_length) -> TextEncoder` mapping its checkpoint onto `text_encoder.TextTransformer`
with `text_encoder.assemble`. Adding one: write its file and add its `load` to TEXT_ENCODERS."""

from __future__ import annotations

from typing import Callable

from diffusion_jax.models.text_encoder import TextEncoder
from diffusion_jax.models.text_encoders import clip, minilm

TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {"minilm": minilm.load, "clip": clip.load}


def load_text_encoder(name: str, model_dir: str | None = None, max_length: int = 16) -> TextEncoder:
  """The encoder `name` of TEXT_ENCODERS, from `model_dir` or its default location (a wheel, the hub cache),
  tokenizing to `max_length` tokens; ValueError for a name not in TEXT_ENCODERS."""
  if name not in TEXT_ENCODERS:
    raise ValueError(f"unknown text encoder {name!r}; choose one of {tuple(TEXT_ENCODERS)}")
  return TEXT_ENCODERS[name](model_dir, max_length)
