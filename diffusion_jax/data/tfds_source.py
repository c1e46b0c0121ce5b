"""Any tensorflow-datasets image dataset as a random-access source (`tfds.data_source`: array_record files
read record by record, never loaded whole), records normalised to {"image", "label", "caption"}."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.data.pipeline import DataNotFoundError


class TfdsNotAvailableError(DataNotFoundError):
  """A tfds dataset that is neither prepared in data_dir nor downloadable here; one line with what to do."""


def open_tfds_source(name: str, split: str, data_dir: str | None):
  """tfds.data_source(name, split): prepared array_record files in data_dir (tfds' default when None), else
  downloaded and prepared (needs internet)."""
  import tensorflow_datasets as tfds  # imports TensorFlow: start-up only, never in the step
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many kinds for "not prepared"
    error = e
  if _online():  # offline, tfds would retry its downloads for minutes before giving up
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises many kinds for "no network" and "no files"
      error = e
  where = f"config.data.data_dir={data_dir!r}" if data_dir else "tfds' default data_dir (~/tensorflow_datasets)"
  reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
  raise TfdsNotAvailableError(
      f"tfds dataset {name!r} split {split!r} is not prepared in {where} and could not be downloaded "
      f"({type(error).__name__}: {reason}); prepare it as array_record with internet: tfds build {name} "
      f"--file_format=array_record" + (f" --data_dir={data_dir}" if data_dir else ""))


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
  """Whether tfds' download host answers (a TCP connect, a few seconds at most)."""
  import socket
  try:
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  except OSError:
    return False


def record_caption(record: dict[str, Any]) -> str:
  """A record's caption: a 'caption' / 'text' feature, or the first of 'captions' (coco_captions' nested
  {'text': [...]}); '' when it has none."""
  for key in ("caption", "text"):
    if key in record:
      return _text(record[key])
  captions = record.get("captions")
  if isinstance(captions, dict):
    captions = captions.get("text")
  if captions is not None and len(captions):
    return _text(captions[0])
  return ""


def _text(value: Any) -> str:
  value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def dataset_features(name: str, data_dir: str | None) -> tuple[int, bool]:
  """(number of classes of its 'label' feature or 0, whether it has captions) from the builder's info."""
  import tensorflow_datasets as tfds
  try:
    info = tfds.builder(name, data_dir=data_dir).info
  except Exception as e:
    raise ValueError(f"config.data.dataset={name!r} is invalid: not fashion_mnist, mnist, image_folder or a "
                     f"tensorflow-datasets dataset here ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:160]})") from None
  label = info.features.get("label") if hasattr(info.features, "get") else None
  num_classes = int(getattr(label, "num_classes", 0) or 0)
  keys = set(info.features.keys())
  return num_classes, bool(keys & {"caption", "text", "captions"})


class TfdsSource:
  """Random access: record i = {"image": uint8 [S,S,C] (resized, centre-cropped), "label": int32 (-1 without
  labels), "caption": str}. Picklable: each grain worker opens its own reader."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int, channels: int):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_size, self.channels = image_size, channels
    self._source = open_tfds_source(name, split, data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from diffusion_jax.data.image_folder import fit_image
    record = self._source[int(i)]
    label = record.get("label", -1)
    return {"image": fit_image(np.asarray(record["image"]), self.image_size, self.channels),
            "label": np.int32(label if np.ndim(label) == 0 else -1), "caption": record_caption(record)}
