"""Frozen pretrained text encoders in Flax: all-MiniLM-L6-v2 (BERT) and CLIP's text transformer.

One `TextTransformer` serves both (post-LN BERT, pre-LN causal CLIP); each encoder is a small file under
`text_encoders/` whose `load()` maps its PyTorch safetensors (Linear weights are (out, in)) onto the Flax tree
with `assemble`. `encode_prompts` returns the
per-token hidden states [B,L,D] and the attention mask [B,L] that the U-Net's cross-attention reads.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import struct
import urllib.request
import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import masked_mean

TOKENIZERS_PIP = "pip install tokenizers"
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"


# ---------------------------------------------------------------- weights and tokenizer files

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file (8-byte header size, JSON header, raw little-endian data) -> numpy arrays."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    if info["dtype"] == "BF16":  # bfloat16 = the upper half of a float32
      raw = np.frombuffer(data[start:end], np.uint16).astype(np.uint32) << 16
      array = raw.view(np.float32)
    elif info["dtype"] in _SAFETENSORS_DTYPES:
      array = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[info["dtype"]])
    else:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
    out[name] = array.reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Write float32/int64 numpy arrays as .safetensors (tests build fake checkpoints with it)."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    chunks.append(array.tobytes())
    offset += array.nbytes
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def download_from_hub(repo: str, files: Sequence[str], cache_dir: str | None = None) -> str:
  """Fetch `files` of a Hugging Face hub repo into ~/.cache/diffusion_jax/hub/<repo> (once); returns the dir."""
  directory = os.path.join(cache_dir or os.path.expanduser("~/.cache/diffusion_jax/hub"), repo.replace("/", "--"))
  os.makedirs(directory, exist_ok=True)
  for name in files:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      continue
    url = HUB_URL.format(repo=repo, file=name)
    try:
      urllib.request.urlretrieve(url, path + ".part")
    except OSError as e:
      raise FileNotFoundError(f"could not download {url} ({e}); without internet, download {repo} elsewhere and "
                              f"set config.text.model_dir to a directory holding {list(files)}") from None
    os.replace(path + ".part", path)
  return directory


class Tokenizer:
  """A `tokenizers` tokenizer.json, padded/truncated to a fixed length so every batch compiles once."""

  def __init__(self, path: str, max_length: int, pad_id: int):
    try:
      import tokenizers
    except ImportError:
      raise ImportError(f"text conditioning needs the 'tokenizers' package: {TOKENIZERS_PIP}") from None
    if max_length < 2:
      raise ValueError(f"text max_length must be >= 2 (a start and an end token), got {max_length}")
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
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


# ---------------------------------------------------------------- the transformer

@dataclasses.dataclass(frozen=True)
class TransformerSpec:
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
  spec: TransformerSpec

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
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
    return self.module.spec.hidden

  @property
  def max_length(self) -> int:
    return self.tokenizer.max_length

  @functools.cached_property
  def _apply(self) -> Callable:
    return jax.jit(self.module.apply)

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
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
  with open(os.path.join(model_dir, "config.json")) as f:
    c = json.load(f)
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


TEXT_ENCODERS = ("minilm", "clip")  # diffusion_jax/models/text_encoders/<name>.py, each with load()


def load_text_encoder(name: str, model_dir: str | None = None, max_length: int = 16) -> TextEncoder:
  """One of TEXT_ENCODERS by name, from `model_dir` or its default location."""
  if name not in TEXT_ENCODERS:
    raise ValueError(f"unknown text encoder {name!r}; choose one of {TEXT_ENCODERS}")
  return importlib.import_module(f"diffusion_jax.models.text_encoders.{name}").load(model_dir, max_length)
