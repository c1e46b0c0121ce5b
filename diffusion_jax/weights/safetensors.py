"""The .safetensors format without the `safetensors` package: an 8-byte little-endian header size, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""

from __future__ import annotations

import json
import struct

import ml_dtypes  # numpy's bfloat16; a dependency of jax
import numpy as np
from etils import epath

# The format is little-endian whatever the host is, hence explicit "<" dtypes.
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the .safetensors file at `path` (local or any epath) as a numpy array.

  BF16 tensors come back as float32 (exactly: bfloat16 is the upper half of a float32), so callers never
  meet an ml_dtypes array; the others keep their dtype. Raises ValueError for a dtype not in the table.
  """
  blob = memoryview(epath.Path(path).read_bytes())  # slices of a memoryview do not copy the tensor bytes
  (size,) = struct.unpack("<Q", blob[:8])
  header = json.loads(bytes(blob[8:8 + size]))
  data = blob[8 + size:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end], _DTYPES[info["dtype"]]).reshape(info["shape"])
    out[name] = array.astype(np.float32) if info["dtype"] == "BF16" else array
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Write numpy arrays (float64/32/16, ml_dtypes.bfloat16, int64/32/16/8, uint8, bool) to `path` as
  .safetensors, in the order given; tests build fake checkpoints with it. ValueError for other dtypes."""
  header, chunks, offset = {}, [], 0
  for name, array in tensors.items():
    dtype = np.asarray(array).dtype.newbyteorder("<")  # a big-endian array is written little-endian
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {dtype}; .safetensors takes {sorted(map(str, _NAMES))}")
    raw = np.ascontiguousarray(array, dtype).tobytes()
    header[name] = {"dtype": _NAMES[dtype], "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  epath.Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
