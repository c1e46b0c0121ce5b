"""PyTorch .pth state dicts as numpy arrays, without torch.

A .pth file is a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
calls over storages named by persistent ids; the storage bytes sit beside the pickle, either as
`<archive>/data/<key>` entries of a zip (torch >= 1.6) or, in the legacy stream format, after it.
The unpickler below accepts only those few globals, so reading a file never runs arbitrary code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes  # numpy's bfloat16; a dependency of jax
import numpy as np
from etils import epath

# Storage class name -> numpy dtype; torch writes storages in the host's (in practice little-endian) order.
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Storage:
  """A storage's dtype, named by the pickle; its bytes are attached once the pickle has been read."""

  def __init__(self, dtype: Any):
    self.dtype, self.data = np.dtype(dtype), None


class _LazyTensor:
  """A tensor as the pickle describes it: a strided view of a storage whose bytes may come later."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.data
    item = flat.dtype.itemsize
    array = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * item for s in self.stride]).copy()
    # bfloat16 comes back as float32 (exact), as read_safetensors does, so callers never meet ml_dtypes arrays.
    return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs) -> _LazyTensor:
  return _LazyTensor(storage, storage_offset, size, stride)  # requires_grad, hooks, metadata: irrelevant here


class _TorchUnpickler(pickle.Unpickler):
  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch" and name in _DTYPES:
      return name  # persistent_load looks the dtype up by the class name
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weight file")

  def persistent_load(self, pid: Any) -> _Storage:
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (isinstance(pid, tuple) and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    key = str(pid[2])
    if key not in self.storages:
      self.storages[key] = _Storage(_DTYPES[pid[1]])
    return self.storages[key]


def _materialize(obj: Any) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  return obj


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The PyTorch state dict saved at `path` (local or any epath) as numpy arrays, from the zip format
  (torch >= 1.6) or the legacy stream; bfloat16 tensors come back as float32."""
  storages: dict[str, _Storage] = {}
  with epath.Path(path).open("rb") as f:
    if zipfile.is_zipfile(f):
      with zipfile.ZipFile(f) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        prefix = pkl[:-len("data.pkl")]
        obj = _TorchUnpickler(io.BytesIO(zf.read(pkl)), storages).load()
        for key, storage in storages.items():
          storage.data = np.frombuffer(zf.read(f"{prefix}data/{key}"), storage.dtype)
    else:
      f.seek(0)  # is_zipfile read the end of the file
      for _ in range(3):  # magic number, protocol version, system info (plain ints and a dict)
        _TorchUnpickler(f, storages).load()
      obj = _TorchUnpickler(f, storages).load()
      for key in _TorchUnpickler(f, storages).load():  # the storage keys, in the order their bytes follow
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        storage.data = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype)
  return _materialize(obj)
