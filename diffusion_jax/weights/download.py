"""Fetching weight files once into a local cache: one download helper for the hub's text encoders and the
FID Inception weights. Offline, a missing file is one FileNotFoundError saying what to do instead."""

from __future__ import annotations

import os
import urllib.request
from typing import Sequence

HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"


def default_cache_dir() -> str:
  """The local cache for downloaded weights: $DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax."""
  return os.environ.get("DIFFUSION_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax"))


def download_file(url: str, path: str, *, what_to_do_offline: str) -> str:
  """Download `url` to the local file `path` unless it exists; returns `path`.

  The bytes go to `path + ".part"`, renamed only when complete, so an interrupted download never leaves a
  file that looks finished. A failure (offline, HTTP error, truncated body) removes the partial file and
  raises FileNotFoundError naming the URL, the error and `what_to_do_offline`; so does a remote `path`
  (gs://...), which this does not write to.
  """
  if os.path.exists(path):
    return path
  if "://" in path:  # urlretrieve and os write local files only; a remote copy is for the user to upload
    raise FileNotFoundError(f"{path} does not exist and {url} is only downloaded to local paths; "
                            f"{what_to_do_offline}")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  part = path + ".part"
  try:
    urllib.request.urlretrieve(url, part)
  except OSError as e:  # URLError, HTTPError and ContentTooShortError are all OSErrors
    if os.path.exists(part):
      os.remove(part)
    raise FileNotFoundError(f"could not download {url} ({e}); {what_to_do_offline}") from None
  os.replace(part, path)
  return path


def download_from_hub(repo: str, files: Sequence[str], cache_dir: str | None = None) -> str:
  """Fetch `files` of the Hugging Face hub repo `repo` ("owner/name") into <cache_dir>/owner--name, each
  once; `cache_dir` defaults to hub/ in `default_cache_dir()`. Returns that directory."""
  directory = os.path.join(cache_dir or os.path.join(default_cache_dir(), "hub"), repo.replace("/", "--"))
  for name in files:
    download_file(HUB_URL.format(repo=repo, file=name), os.path.join(directory, name),
                  what_to_do_offline=f"without internet, download {repo} elsewhere and set config.text.model_dir "
                                     f"to a directory holding {list(files)}")
  return directory
