"""Batches streamed from a random-access source (an image folder, a tfds dataset) with grain: a global
shuffle with the seed (reshuffled every epoch), this process's rows of each global batch, decoding in worker
processes, a prefetch buffer. The rows of step s are a function of (seed, s) alone (data.pipeline.process_rows),
so a run resumed at step s reads exactly the batches an uninterrupted run would have: the iterator's state is
the step, which every checkpoint holds."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from diffusion_jax.data.pipeline import flip_images, process_rows, scale_images

_ENDLESS = 1 << 60  # rows of an endless stream (grain's repeat() of a shuffled epoch)


class _Row:
  """Local row k of this process's stream from `start_step` -> (global position, record): picklable for
  grain's worker processes."""

  def __init__(self, records, start_step: int, global_batch: int, process_index: int, process_count: int,
               seed: int, random_flip: bool):
    self.records, self.start_step, self.seed, self.random_flip = records, start_step, seed, random_flip
    self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count

  def __call__(self, k: int) -> dict[str, Any]:
    local = self.global_batch // self.process_count
    step, row = self.start_step + k // local, k % local
    position = int(process_rows(step, self.global_batch, self.process_index, self.process_count)[row])
    record = self.records[position]
    image = scale_images(np.asarray(record["image"])[None])
    if self.random_flip:
      image = flip_images(image, np.random.default_rng([self.seed, position]).random(1) < 0.5)
    return {"image": image[0], "label": np.int32(record["label"]), "caption": str(record["caption"])}


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """In each grain worker: Ctrl-C reaches the whole process group, but only the training process handles it
  (saves the step, then stops the workers); workers that took it too would print a traceback each."""
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamingBatches:
  """This process's rows of the global batch of step s, as InMemoryBatches gives them, from a source of
  records {"image": uint8 [H,W,C], "label", "caption"}: {"image": float32 [b,H,W,C] in [-1, 1], "label": int32
  [b], "caption": str [b]}. `batch(s)` for consecutive s reads a grain iterator with `num_workers` decoding
  processes (0: in this process); any other s starts a new iterator there."""

  def __init__(self, source, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
               random_flip: bool = False, num_workers: int = 0, prefetch: int = 2):
    import grain
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} must be divisible by the process count {process_count}")
    if len(source) == 0:
      raise ValueError("the dataset is empty")
    self.source, self.global_batch, self.local_batch = source, global_batch, global_batch // process_count
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.random_flip, self.num_workers, self.prefetch = random_flip, num_workers, prefetch
    # grain's shuffle is a pseudo-random index permutation (no table in memory); repeat() reshuffles each epoch.
    self.records = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    self._iterator, self._next_step = None, None

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    import grain
    rows = _Row(self.records, start_step, self.global_batch, self.process_index, self.process_count, self.seed,
                self.random_flip)
    dataset = grain.MapDataset.range(0, _ENDLESS).map(rows).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch * self.local_batch))
    if self.num_workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside main (tests, scripts) use defaults
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch * self.local_batch),
          worker_init_fn=_ignore_sigint)
    # Rows are decoded in the workers and stacked here: batches then live in this process's memory, not in
    # shared-memory blocks that outlive an iterator stopped mid-stream.
    return iter(dataset.batch(self.local_batch))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    if self._iterator is None or step != self._next_step:
      self._iterator = self.iterate(step)
    self._next_step = step + 1
    return next(self._iterator)

  def close(self) -> None:
    """Stop the worker processes (and free their shared memory) before the interpreter exits."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()
    del iterator
    import gc
    gc.collect()
