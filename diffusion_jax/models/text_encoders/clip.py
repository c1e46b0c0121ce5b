"""CLIP's text transformer (Radford et al. 2021; Stable Diffusion 1.x uses clip-vit-large-patch14): pre-LN,
causal, quick-GELU, final LayerNorm; from a local Hugging Face directory or downloaded from the hub."""

from __future__ import annotations

import os

from diffusion_jax.models.text_encoder import TextEncoder, assemble, hf_spec, read_config
from diffusion_jax.weights.download import download_from_hub
from diffusion_jax.weights.safetensors import read_safetensors

REPO = "openai/clip-vit-large-patch14"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def load(directory: str | None = None, max_length: int = 77) -> TextEncoder:
  """CLIP's text tower from `directory` (config.json, model.safetensors, tokenizer.json), by default
  downloaded once from the hub into the weights cache."""
  directory = directory or download_from_hub(REPO, FILES)
  c = read_config(directory, nested="text_config")  # a full CLIPModel config nests the text tower's
  spec = hf_spec(c, activation=c.get("hidden_act", "quick_gelu"), pre_norm=True, causal=True,
                 layer_norm_eps=c.get("layer_norm_eps", 1e-5))
  w = read_safetensors(os.path.join(directory, "model.safetensors"))
  w = {k.removeprefix("text_model."): v for k, v in w.items() if not k.startswith("vision_model.")}
  top = {"token_embedding": "embeddings.token_embedding", "position_embedding": "embeddings.position_embedding",
         "final_norm": "final_layer_norm"}
  names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
           "mlp.fc1", "mlp.fc2", "layer_norm2")
  return assemble("clip", directory, spec, w, top, "encoder.layers.", names, max_length, c.get("pad_token_id", 1))
