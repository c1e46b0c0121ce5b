"""Frozen pretrained text encoders in Flax: all-MiniLM-L6-v2 (BERT) and CLIP's text transformer.

One `TextTransformer` serves both (post-LN BERT, pre-LN causal CLIP); each encoder is a small file under
`text_encoders/` whose `load()` maps its PyTorch safetensors (Linear weights are (out, in)) onto the Flax tree
with `assemble`, and `text_encoders.TEXT_ENCODERS` names them (this module never imports that package: its
files import this one). `encode_prompts` returns the per-token hidden states [B,L,D] and the attention mask
[B,L] that the U-Net's cross-attention reads. Weight files are read by `diffusion_jax.weights`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.models.layers import masked_mean
from diffusion_jax.models.tokenizer import Tokenizer


# ---------------------------------------------------------------- the transformer

@dataclasses.dataclass(frozen=True)
class TransformerSpec:
  """The shape and switches of a BERT- or CLIP-style text transformer (see `hf_spec`)."""

  vocab_size: int
  max_positions: int
  hidden: int
  heads: int
  layers: int
  intermediate: int
  activation: str  # gelu (erf) | quick_gelu
  pre_norm: bool  # CLIP: LN before each sublayer + final LN; BERT: LN after each residual
  causal: bool
  layer_norm_eps: float
  type_vocab_size: int = 0  # BERT's token-type embedding (type 0 always)


_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
                "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}  # CLIP's approximation


class TransformerLayer(nn.Module):
  """One self-attention + MLP block, pre-LN (CLIP) or post-LN (BERT) by `spec.pre_norm`."""

  spec: TransformerSpec

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [B,L,hidden] and an additive attention bias broadcastable to [B,heads,L,L] (0 where a query may
    attend a key, float32 min where not) -> [B,L,hidden]."""
    s = self.spec
    b, length, _ = x.shape
    norm = lambda name: nn.LayerNorm(epsilon=s.layer_norm_eps, name=name)
    h = norm("attn_norm")(x) if s.pre_norm else x
    q, k, v = (nn.Dense(s.hidden, name=n)(h).reshape(b, length, s.heads, -1) for n in ("query", "key", "value"))
    attn = jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(b, length, s.hidden)  # Vaswani 2017, eq. 1
    x = x + nn.Dense(s.hidden, name="attn_out")(attn)
    x = x if s.pre_norm else norm("attn_norm")(x)
    h = norm("mlp_norm")(x) if s.pre_norm else x
    h = nn.Dense(s.hidden, name="mlp_out")(_ACTIVATIONS[s.activation](nn.Dense(s.intermediate, name="mlp_in")(h)))
    x = x + h
    return x if s.pre_norm else norm("mlp_norm")(x)


class TextTransformer(nn.Module):
  """Token ids [B,L] + mask [B,L] -> hidden states [B,L,hidden] (BERT or CLIP text tower)."""

  spec: TransformerSpec

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int [B,L], mask [B,L] (1: token, 0: padding) -> hidden states [B,L,hidden]."""
    s = self.spec
    length = ids.shape[1]
    if length > s.max_positions:
      raise ValueError(f"{length} tokens exceed the encoder's {s.max_positions} positions")
    x = nn.Embed(s.vocab_size, s.hidden, name="token_embedding")(ids)
    x = x + nn.Embed(s.max_positions, s.hidden, name="position_embedding")(jnp.arange(length))[None]
    if s.type_vocab_size:
      x = x + nn.Embed(s.type_vocab_size, s.hidden, name="type_embedding")(jnp.zeros_like(ids))
    if not s.pre_norm:
      x = nn.LayerNorm(epsilon=s.layer_norm_eps, name="embed_norm")(x)
    allowed = mask[:, None, None, :].astype(bool)  # [B,1,1,L]: padding keys are never attended
    if s.causal:
      allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, None]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(x.dtype)
    for i in range(s.layers):
      x = TransformerLayer(s, name=f"layer_{i}")(x, bias)
    if s.pre_norm:
      x = nn.LayerNorm(epsilon=s.layer_norm_eps, name="final_norm")(x)
    return x


def _dense(weights: dict, prefix: str) -> dict:
  return {"kernel": weights[prefix + ".weight"].T, "bias": weights[prefix + ".bias"]}  # torch Linear is (out, in)


def _norm(weights: dict, prefix: str) -> dict:
  return {"scale": weights[prefix + ".weight"], "bias": weights[prefix + ".bias"]}


# ---------------------------------------------------------------- the encoders

@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A frozen encoder: prompts -> (hidden [B,L,dim] float32, mask [B,L] int32)."""

  name: str
  module: TextTransformer
  params: Any
  tokenizer: Tokenizer

  @property
  def dim(self) -> int:
    """The width of the hidden states (the U-Net's context_dim)."""
    return self.module.spec.hidden

  @property
  def max_length(self) -> int:
    """The fixed number of tokens per prompt."""
    return self.tokenizer.max_length

  @functools.cached_property
  def _apply(self) -> Callable:
    return jax.jit(self.module.apply)

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (hidden states float32 [B,L,dim], mask int32 [B,L])."""
    ids, mask = self.tokenizer(prompts)
    return np.asarray(self._apply(self.params, ids, mask)), mask


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings of `prompts`, each distinct prompt encoded once (cache by prompt): [B,L,D], [B,L]."""
  unique, inverse = np.unique(np.asarray(list(prompts), dtype=object).astype(str), return_inverse=True)
  hidden, mask = encoder([str(p) for p in unique])
  return hidden[inverse], mask[inverse]


def mean_pooled_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """sentence-transformers' Pooling(mean) + Normalize: [B,L,D], [B,L] -> unit vectors [B,D]."""
  pooled = np.asarray(masked_mean(hidden, mask))
  return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


LAYER_PARTS = ("query", "key", "value", "attn_out", "attn_norm", "mlp_in", "mlp_out", "mlp_norm")


def read_config(model_dir: str, nested: str | None = None) -> dict:
  """`model_dir`/config.json (local or any epath) as a dict, or its `nested` sub-config when it has one."""
  c = json.loads((epath.Path(model_dir) / "config.json").read_text())
  return c.get(nested, c) if nested else c


def hf_spec(c: dict, **architecture) -> TransformerSpec:
  """A TransformerSpec from a Hugging Face config.json's common keys plus the architecture's own switches."""
  return TransformerSpec(vocab_size=c["vocab_size"], max_positions=c["max_position_embeddings"],
                         hidden=c["hidden_size"], heads=c["num_attention_heads"], layers=c["num_hidden_layers"],
                         intermediate=c["intermediate_size"], **architecture)


def assemble(name: str, model_dir: str, spec: TransformerSpec, weights: dict, top: dict[str, str],
             layer_prefix: str, layer_names: Sequence[str], max_length: int, pad_id: int) -> TextEncoder:
  """Map PyTorch tensor names onto the Flax tree: `top` {flax name: torch prefix} (embeddings, norms) and, per
  layer i, `layer_prefix`i.`layer_names` in LAYER_PARTS order."""
  params = {k: _norm(weights, v) if k.endswith("norm") else {"embedding": weights[v + ".weight"]}
            for k, v in top.items()}
  for i in range(spec.layers):
    params[f"layer_{i}"] = {part: (_norm if part.endswith("norm") else _dense)(weights, f"{layer_prefix}{i}.{n}")
                            for part, n in zip(LAYER_PARTS, layer_names)}
  tokenizer = Tokenizer(os.path.join(model_dir, "tokenizer.json"), max_length, pad_id)
  return TextEncoder(name, TextTransformer(spec), {"params": jax.tree.map(jnp.asarray, params)}, tokenizer)

