"""What a conditional model is conditioned on: class labels, or text prompts through a frozen text encoder.

Text models train on captions: each class has several natural templates, all embedded once into a table
(row 0 is the empty prompt, the null condition of classifier-free guidance), and the train step draws a
caption per example by index, so the encoder never runs inside training.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import diffusion as D

KINDS = ("none", "class", "text")

# Training captions per class (several natural templates each); a prompt never seen in training works too.
CAPTIONS = {
    "fashion_mnist": (
        ("a photo of a t-shirt", "a t-shirt, studio shot", "a short-sleeved top", "a plain tee on a dark background",
         "a product photo of a t-shirt"),
        ("a pair of trousers", "a photo of trousers", "trousers, studio shot", "a pair of long pants",
         "a product photo of trousers"),
        ("a photo of a pullover", "a pullover, studio shot", "a knitted sweater", "a long-sleeved pullover",
         "a product photo of a pullover"),
        ("a photo of a dress", "a dress, studio shot", "a woman's dress", "a simple summer dress",
         "a product photo of a dress"),
        ("a photo of a coat", "a coat, studio shot", "a warm winter coat", "a long coat with buttons",
         "a product photo of a coat"),
        ("a photo of a sandal", "a sandal, studio shot", "an open summer sandal", "a strappy sandal",
         "a product photo of a sandal"),
        ("a photo of a shirt", "a shirt, studio shot", "a button-up shirt", "a collared shirt",
         "a product photo of a shirt"),
        ("a photo of a sneaker", "a sneaker, studio shot", "a sports shoe", "a low sneaker seen from the side",
         "a product photo of a sneaker"),
        ("a photo of a bag", "a bag, studio shot", "a leather handbag", "a bag with a handle",
         "a product photo of a bag"),
        ("a photo of an ankle boot", "an ankle boot, studio shot", "a short leather boot", "a heeled ankle boot",
         "a product photo of an ankle boot"),
    ),
    "mnist": tuple(
        (f"a handwritten digit {d}", f"the number {w}", f"a {w} written by hand", f"digit {d}, white on black")
        for d, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))),
    "cifar10": tuple(
        (f"a photo of {a}", f"a small photo of {a}", f"a blurry photo of {a}", f"a picture of {a} outdoors")
        for a in ("an airplane", "an automobile", "a bird", "a cat", "a deer", "a dog", "a frog", "a horse",
                  "a ship", "a truck")),
}

# Paraphrases that appear in no training caption: the guidance benchmark and tests prompt with them.
PARAPHRASES = {
    "fashion_mnist": ("a casual cotton tee", "some blue jeans", "a cozy jumper for winter", "an elegant evening gown",
                      "a heavy overcoat", "beach footwear with straps", "a formal office blouse",
                      "a running trainer", "a purse to carry things", "a boot that covers the ankle"),
}


def condition_kind(config: ml_collections.ConfigDict) -> str:
  """'text' with a text encoder, 'class' with model.num_classes > 0, else 'none'."""
  if config.get("text") is not None and config.text.encoder:
    return "text"
  return "class" if config.model.num_classes else "none"


def dataset_captions(dataset: str) -> tuple[tuple[str, ...], ...]:
  if dataset not in CAPTIONS:
    raise ValueError(f"config.data.dataset={dataset!r} is invalid: text conditioning needs captions; captioned "
                     f"datasets: {tuple(CAPTIONS)}")
  return CAPTIONS[dataset]


@flax.struct.dataclass
class TextTable:
  """Every training caption embedded once: context [P,L,D], mask [P,L]; caption_ids [K,T] rows of the table per
  class (padded by repeating), counts [K]. Row 0 is the empty prompt (the null condition)."""

  context: jax.Array
  mask: jax.Array
  caption_ids: jax.Array
  counts: jax.Array


def build_text_table(encoder, captions: Sequence[Sequence[str]]) -> TextTable:
  """Embed "" and every caption of every class in one encoder batch."""
  from diffusion_jax.models.text_encoder import encode_prompts
  flat = [""] + [c for per_class in captions for c in per_class]
  context, mask = encode_prompts(encoder, flat)
  width = max(len(c) for c in captions)
  ids, start = np.zeros((len(captions), width), np.int32), 1
  for k, per_class in enumerate(captions):
    ids[k] = np.resize(np.arange(start, start + len(per_class)), width)
    start += len(per_class)
  return TextTable(context=jnp.asarray(context), mask=jnp.asarray(mask), caption_ids=jnp.asarray(ids),
                   counts=jnp.asarray([len(c) for c in captions], jnp.int32))


def train_condition(kind: str, key: jax.Array, labels: jax.Array | None, p_uncond: float, null_label: int,
                    table: TextTable | None) -> dict[str, jax.Array]:
  """The condition of a training batch, with condition dropout (Ho & Salimans 2022, algorithm 1): {} / {"y"} /
  {"context", "context_mask"} for a random caption of each example's class (row 0, "", when dropped)."""
  if kind == "none":
    return {}
  key_drop, key_caption = jax.random.split(key)
  if kind == "class":
    return {"y": D.drop_labels(key_drop, labels, p_uncond, null_label)}
  choice = jax.random.randint(key_caption, labels.shape, 0, table.counts[labels])
  rows = D.drop_labels(key_drop, table.caption_ids[labels, choice], p_uncond, 0)
  return {"context": table.context[rows], "context_mask": table.mask[rows]}


def parse_prompts(prompt: Any) -> list[str]:
  """sample.prompt: one string ('|' separates several prompts) or a sequence of strings."""
  if prompt is None or prompt == "":
    return []
  if isinstance(prompt, str):
    return [p.strip() for p in prompt.split("|")]
  if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
    return list(prompt)
  raise ValueError(f"config.sample.prompt={prompt!r} is invalid: give a string ('|' separates prompts) or strings")


def _one_or_each(values: Sequence, num_images: int, key: str, noun: str) -> np.ndarray:
  """`values` repeated to [num_images]; a ValueError unless there is one value or exactly num_images."""
  if len(values) not in (1, num_images):
    raise ValueError(f"config.sample.{key} has {len(values)} {noun} but sample.num_images={num_images}: give one "
                     f"(used for every image) or exactly num_images (e.g. --config.sample.num_images={len(values)})")
  return np.resize(np.asarray(values, dtype=object if noun == "prompts" else np.int32), num_images)


def check_prompts(prompts: Sequence[str], num_images: int) -> None:
  if prompts:
    _one_or_each(prompts, num_images, "prompt", "prompts")


def requested_labels(config: ml_collections.ConfigDict, num_images: int, num_classes: int, *,
                     every_class: bool = False) -> np.ndarray:
  """Class labels int [N] to sample: sample.class_labels ('3' or '0,3,7': one label, or exactly num_images),
  else sample.class_label (-1: every class in turn, as `every_class` always does)."""
  text = "" if every_class else str(config.sample.get("class_labels") or "")
  if text.strip():
    try:
      labels = [int(x) for x in text.split(",")]
    except ValueError:
      raise ValueError(f"config.sample.class_labels={text!r} is invalid: give comma-separated class indices, "
                       f"e.g. '0,3,7'") from None
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
      raise ValueError(f"config.sample.class_labels={text!r} is invalid: {bad} out of range [0, {num_classes})")
    return _one_or_each(labels, num_images, "class_labels", "labels")
  label = -1 if every_class else config.sample.class_label
  return np.full(num_images, label, np.int32) if label >= 0 else np.arange(num_images, dtype=np.int32) % num_classes


def sample_prompts_and_labels(config: ml_collections.ConfigDict, num_images: int, *, every_class: bool = False
                              ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(labels int [N] or None, prompts str [N] or None) to sample: the given prompts (label = the class whose
  caption they are, else -1), or the requested classes (`requested_labels`; text models use each class's first
  caption)."""
  kind = condition_kind(config)
  if kind == "none":
    return None, None
  if kind == "class":
    return requested_labels(config, num_images, config.model.num_classes, every_class=every_class), None
  captions = dataset_captions(config.data.dataset)
  prompts = [] if every_class else parse_prompts(config.sample.prompt)
  if prompts:
    prompts = _one_or_each(prompts, num_images, "prompt", "prompts")
    owner = {c: k for k, per_class in enumerate(captions) for c in per_class}
    labels = np.asarray([owner.get(p, -1) for p in prompts], np.int32)
  else:
    labels = requested_labels(config, num_images, len(captions), every_class=every_class)
    prompts = np.asarray([captions[k][0] for k in labels], dtype=object)
  return labels, prompts.astype(str)


def sample_condition(kind: str, labels: np.ndarray | None, prompts: np.ndarray | None, null_label: int,
                     encoder=None) -> tuple[dict, dict]:
  """(cond, null_cond) host pytrees with a leading [N] axis, for guided sampling."""
  if kind == "none":
    return {}, {}
  if kind == "class":
    return {"y": labels}, {"y": np.full_like(labels, null_label)}
  from diffusion_jax.models.text_encoder import encode_prompts
  context, mask = encode_prompts(encoder, list(prompts) + [""])  # each distinct prompt encoded once
  n = len(prompts)
  return ({"context": context[:n], "context_mask": mask[:n]},
          {"context": np.repeat(context[n:], n, 0), "context_mask": np.repeat(mask[n:], n, 0)})


def sampling_inputs(config: ml_collections.ConfigDict, num_images: int, encoder=None, *, every_class: bool = False
                    ) -> tuple[np.ndarray | None, np.ndarray | None, dict, dict]:
  """(labels, prompts, cond, null_cond) to sample `num_images` from the config's kind of model (None/{} when it is
  unconditional): `sample_prompts_and_labels` then `sample_condition`."""
  labels, prompts = sample_prompts_and_labels(config, num_images, every_class=every_class)
  cond, null_cond = sample_condition(condition_kind(config), labels, prompts, config.model.num_classes, encoder)
  return labels, prompts, cond, null_cond


def load_encoder(config: ml_collections.ConfigDict):
  """The config's frozen text encoder (text.encoder, text.model_dir, text.max_length), checked against the U-Net."""
  from diffusion_jax.models.text_encoder import load_text_encoder
  encoder = load_text_encoder(config.text.encoder, config.text.model_dir, config.text.max_length)
  if encoder.dim != config.model.context_dim:
    raise ValueError(f"config.model.context_dim={config.model.context_dim} does not match the {encoder.name} "
                     f"encoder's width {encoder.dim}: set --config.model.context_dim={encoder.dim}")
  return encoder
