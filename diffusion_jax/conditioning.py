"""What a conditional model is conditioned on: class labels, or text prompts through a frozen text encoder.

Text models train on captions: each class has several natural templates, all embedded once into a table
(row 0 is the empty prompt, the null condition of classifier-free guidance), and the train step draws a
caption per example by index, so the encoder never runs inside training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as D

KINDS = ("none", "class", "text")
NULL_PROMPT = ""  # text models' null condition (classifier-free guidance): row 0 of the caption table

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


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
  """What a model is conditioned on, decided once from the config (build.condition_spec).

  kind: 'none', 'class' (labels [B], label `num_classes` is the null class) or 'text' (captions; `captions`
  holds each class's training captions, and the null condition is the empty prompt).
  """

  kind: str = "none"
  num_classes: int = 0
  p_uncond: float = 0.0  # condition dropout in training (classifier-free guidance)
  captions: tuple[tuple[str, ...], ...] = ()
  # Text: True when every example has its own caption (an image folder's metadata.jsonl, a tfds caption
  # feature): the batch carries its tokens and the frozen encoder runs inside the train step; `captions` then
  # holds a few of the dataset's captions, one per "class", the prompts of default samples.
  per_image_captions: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"condition kind {self.kind!r} is invalid: choose one of {KINDS}")

  @property
  def num_labels(self) -> int:
    """How many classes sampling can ask for: the model's classes, or the classes with captions."""
    return {"none": 0, "class": self.num_classes, "text": len(self.captions)}[self.kind]


def dataset_captions(dataset: str) -> tuple[tuple[str, ...], ...]:
  if dataset not in CAPTIONS:
    raise ValueError(f"config.data.dataset={dataset!r} is invalid: text conditioning needs captions; captioned "
                     f"datasets: {tuple(CAPTIONS)}")
  return CAPTIONS[dataset]


@flax.struct.dataclass
class CaptionEncoder:
  """Per-image captions: the frozen encoder's params and the empty prompt's tokens [1,L] (the null condition
  that caption dropout swaps in); the encoder module itself is a static argument of the train step."""

  params: Any
  null_ids: jax.Array
  null_mask: jax.Array


def caption_encoder(encoder) -> CaptionEncoder:
  ids, mask = encoder.tokenizer([NULL_PROMPT])
  return CaptionEncoder(params=encoder.params, null_ids=jnp.asarray(ids), null_mask=jnp.asarray(mask))


def caption_tokens(encoder, captions) -> dict[str, np.ndarray]:
  """A batch's captions [b] -> {"caption_ids": int32 [b,L], "caption_mask": int32 [b,L]} (host, cheap)."""
  ids, mask = encoder.tokenizer([str(c) for c in captions])
  return {"caption_ids": np.asarray(ids, np.int32), "caption_mask": np.asarray(mask, np.int32)}


@flax.struct.dataclass
class TextTable:
  """Every training caption embedded once: context [P,L,D], mask [P,L]; caption_rows [K,T] the table rows of
  each class's captions (padded by repeating), counts [K]. Row 0 is the empty prompt (the null condition)."""

  context: jax.Array
  mask: jax.Array
  caption_rows: jax.Array
  counts: jax.Array


def build_text_table(encoder, captions: Sequence[Sequence[str]]) -> TextTable:
  """Embed "" and every caption of every class in one encoder batch."""
  from diffusion_jax.models.text_encoder import encode_prompts
  flat = [NULL_PROMPT] + [c for per_class in captions for c in per_class]
  context, mask = encode_prompts(encoder, flat)
  width = max(len(c) for c in captions)
  rows, start = np.zeros((len(captions), width), np.int32), 1
  for k, per_class in enumerate(captions):
    rows[k] = np.resize(np.arange(start, start + len(per_class)), width)
    start += len(per_class)
  return TextTable(context=jnp.asarray(context), mask=jnp.asarray(mask), caption_rows=jnp.asarray(rows),
                   counts=jnp.asarray([len(c) for c in captions], jnp.int32))


def train_condition(spec: ConditionSpec, key: jax.Array, batch: dict[str, jax.Array],
                    table: TextTable | CaptionEncoder | None, text_module=None) -> dict[str, jax.Array]:
  """The condition of a training batch, with condition dropout (Ho & Salimans 2022, algorithm 1): {} / {"y"} /
  {"context", "context_mask"} for a random caption of each example's class (row 0, "", when dropped), or,
  with per-image captions, the frozen `text_module` on the batch's own caption tokens ("" when dropped)."""
  if spec.kind == "none":
    return {}
  key_drop, key_caption = jax.random.split(key)
  labels = batch.get("label")
  if spec.kind == "class":
    return {"y": D.drop_labels(key_drop, labels, spec.p_uncond, spec.num_classes)}
  if spec.per_image_captions:
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    drop = jax.random.bernoulli(key_drop, spec.p_uncond, ids.shape[:1])[:, None]
    ids, mask = jnp.where(drop, table.null_ids, ids), jnp.where(drop, table.null_mask, mask)
    context = jax.lax.stop_gradient(text_module.apply(table.params, ids, mask))  # frozen: no gradient
    return {"context": context, "context_mask": mask}
  choice = jax.random.randint(key_caption, labels.shape, 0, table.counts[labels])
  rows = D.drop_labels(key_drop, table.caption_rows[labels, choice], spec.p_uncond, 0)
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


def parse_class_labels(text: Any, num_labels: int) -> list[int]:
  """sample.class_labels: '' (none given), '3' or '0,3,7' (or an int), each in [0, num_labels)."""
  text = str(text if text is not None else "").strip()
  if not text:
    return []
  try:
    labels = [int(x) for x in text.split(",")]
  except ValueError:
    raise ValueError(f"config.sample.class_labels={text!r} is invalid: give comma-separated class indices, "
                     f"e.g. '0,3,7'") from None
  bad = [x for x in labels if not 0 <= x < num_labels]
  if bad:
    raise ValueError(f"config.sample.class_labels={text!r} is invalid: {bad} out of range [0, {num_labels})")
  return labels


def _one_or_each(values: Sequence, num_images: int, key: str, noun: str) -> np.ndarray:
  """`values` repeated to [num_images]; a ValueError unless there is one value or exactly num_images."""
  if len(values) not in (1, num_images):
    raise ValueError(f"config.sample.{key} has {len(values)} {noun} but sample.num_images={num_images}: give one "
                     f"(used for every image) or exactly num_images (e.g. --config.sample.num_images={len(values)})")
  return np.resize(np.asarray(values, dtype=object if noun == "prompts" else np.int32), num_images)


def sample_prompts_and_labels(spec: ConditionSpec, num_images: int, *, prompt: Any = "", class_labels: Any = ""
                              ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(labels int [N] or None, prompts str [N] or None) to sample: the given prompts (label = the class whose
  caption they are, else -1), else the given class labels (one, or exactly N), else every class in turn; text
  models prompt with each class's first caption. ValueError naming sample.prompt / sample.class_labels."""
  prompts = parse_prompts(prompt)
  if spec.kind == "none":
    if prompts or parse_class_labels(class_labels, 1 << 30):
      raise ValueError(f"config.sample.prompt={prompt!r} / class_labels={class_labels!r} is invalid: prompts and "
                       "labels need a conditional model (set text.encoder or model.num_classes)")
    return None, None
  if spec.kind == "class" and prompts:
    raise ValueError(f"config.sample.prompt={prompt!r} is invalid: prompts need a text-conditional model "
                     "(set text.encoder)")
  if prompts:
    prompts = _one_or_each(prompts, num_images, "prompt", "prompts").astype(str)
    owner = {c: k for k, per_class in enumerate(spec.captions) for c in per_class}
    return np.asarray([owner.get(p, -1) for p in prompts], np.int32), prompts
  given = parse_class_labels(class_labels, spec.num_labels)
  labels = (_one_or_each(given, num_images, "class_labels", "labels") if given
            else np.arange(num_images, dtype=np.int32) % spec.num_labels)
  if spec.kind == "class":
    return labels, None
  return labels, np.asarray([spec.captions[k][0] for k in labels], dtype=str)


def null_condition(spec: ConditionSpec, encoder=None) -> dict[str, np.ndarray]:
  """The unconditional input of a conditional model, one example (leading [1]): the null class, or the
  empty prompt's embedding."""
  if spec.kind == "none":
    return {}
  if spec.kind == "class":
    return {"y": np.full((1,), spec.num_classes, np.int32)}
  from diffusion_jax.models.text_encoder import encode_prompts
  context, mask = encode_prompts(encoder, [NULL_PROMPT])
  return {"context": context, "context_mask": mask}


def sample_condition(spec: ConditionSpec, labels: np.ndarray | None, prompts: np.ndarray | None,
                     encoder=None) -> tuple[dict, dict]:
  """(cond, null_cond) host pytrees with a leading [N] axis, for guided sampling."""
  if spec.kind == "none":
    return {}, {}
  n = len(labels)
  if spec.kind == "class":
    return {"y": labels}, {"y": np.repeat(null_condition(spec)["y"], n)}
  from diffusion_jax.models.text_encoder import encode_prompts
  # One encoder call for the prompts and the null prompt (each distinct prompt encoded once), so previews and
  # final samples of every class share one compiled encoder batch.
  context, mask = encode_prompts(encoder, list(prompts) + [NULL_PROMPT])
  return ({"context": context[:n], "context_mask": mask[:n]},
          {"context": np.repeat(context[n:], n, 0), "context_mask": np.repeat(mask[n:], n, 0)})


def sampling_inputs(spec: ConditionSpec, num_images: int, encoder=None, *, prompt: Any = "",
                    class_labels: Any = "") -> tuple[np.ndarray | None, np.ndarray | None, dict, dict]:
  """(labels, prompts, cond, null_cond) to sample `num_images` (None/{} for an unconditional model):
  `sample_prompts_and_labels` then `sample_condition`; no prompt and no labels = every class in turn."""
  labels, prompts = sample_prompts_and_labels(spec, num_images, prompt=prompt, class_labels=class_labels)
  cond, null_cond = sample_condition(spec, labels, prompts, encoder)
  return labels, prompts, cond, null_cond
