"""A fixed-length tokenizer over a Hugging Face tokenizer.json (the `tokenizers` Rust wheel, no torch)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from etils import epath

TOKENIZERS_PIP = "pip install tokenizers"


class Tokenizer:
  """A `tokenizers` tokenizer.json, padded/truncated to a fixed length so every batch compiles once."""

  def __init__(self, path: str, max_length: int, pad_id: int):
    """Read the tokenizer.json at `path` (local or any epath); ids are padded with `pad_id` to `max_length`."""
    try:
      import tokenizers  # imported here so that the package imports without it; only text models need it
    except ImportError:
      raise ImportError(f"text conditioning needs the 'tokenizers' package: {TOKENIZERS_PIP}") from None
    if max_length < 2:
      raise ValueError(f"text max_length must be >= 2 (a start and an end token), got {max_length}")
    self.tokenizer = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())
    # Padding and truncation are done in __call__: fixed length, and truncation that keeps the end token.
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.max_length, self.pad_id = max_length, pad_id

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (token ids int32 [B,L], mask int32 [B,L]); too long prompts keep their end token, with a warning."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompts must be a list of strings, got {prompts!r}")
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    for i, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
      tokens = encoding.ids
      if len(tokens) > self.max_length:
        warnings.warn(f"prompt {prompts[i][:60]!r}... has {len(tokens)} tokens; truncated to max_length="
                      f"{self.max_length}", stacklevel=2)
        tokens = tokens[:self.max_length - 1] + tokens[-1:]  # keep [SEP] / <|endoftext|>, as HF truncation does
      ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
    return ids, mask
