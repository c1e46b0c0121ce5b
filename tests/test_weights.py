"""diffusion_jax.weights: the safetensors reader/writer, the torch-free .pth reader and the download helper.

The .pth files are built here by hand in PyTorch's own layouts (the zip of torch >= 1.6 and the legacy
stream), so the reader is tested without torch; with torch installed, one more test checks torch.save's files.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import urllib.error
import urllib.request
import zipfile

import ml_dtypes
import numpy as np
import pytest

from diffusion_jax.weights import download
from diffusion_jax.weights.safetensors import read_safetensors, write_safetensors
from diffusion_jax.weights.torch_pickle import load_torch_state_dict

# ---------------------------------------------------------------- safetensors

# numpy dtype -> the name the format uses; the reader gives float32 for BF16.
SAFETENSORS = {np.float64: "F64", np.float32: "F32", np.float16: "F16", ml_dtypes.bfloat16: "BF16",
               np.int64: "I64", np.int32: "I32", np.int16: "I16", np.int8: "I8", np.uint8: "U8", np.bool_: "BOOL"}


def _header(path):
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), f.read()


@pytest.mark.parametrize("dtype", list(SAFETENSORS), ids=list(SAFETENSORS.values()))
def test_safetensors_round_trip_for_each_dtype(tmp_path, dtype):
  path = str(tmp_path / "t.safetensors")
  values = np.array([[0, 1, -2], [3, -4, 5]]) if np.dtype(dtype).kind in "if" else np.array([[0, 1, 2], [3, 4, 5]])
  a = values.astype(dtype) if dtype is not np.bool_ else values % 2 == 0
  write_safetensors(path, {"a": a, "empty": np.zeros((0, 4), dtype), "scalar": np.array(a.flat[1], dtype)})
  header, data = _header(path)
  assert header["a"] == {"dtype": SAFETENSORS[dtype], "shape": [2, 3], "data_offsets": [0, a.nbytes]}
  assert header["empty"]["shape"] == [0, 4] and header["scalar"]["shape"] == []
  assert len(data) == 7 * np.dtype(dtype).itemsize
  out = read_safetensors(path)
  expected_dtype = np.float32 if dtype is ml_dtypes.bfloat16 else dtype
  for name, array in {"a": a, "empty": np.zeros((0, 4)), "scalar": np.array(a.flat[1])}.items():
    assert out[name].dtype == expected_dtype and out[name].shape == array.shape, name
    np.testing.assert_array_equal(out[name], array.astype(expected_dtype), err_msg=name)


def test_safetensors_bits_are_little_endian_and_bfloat16_is_the_upper_half_of_float32(tmp_path):
  path = str(tmp_path / "t.safetensors")
  exact = np.array([1.0, -2.5, 0.15625, 2.0 ** 100], np.float32)  # exact in bfloat16 (8 significant bits)
  write_safetensors(path, {"b": exact.astype(ml_dtypes.bfloat16), "h": np.array([1.0, -2.0], np.float16),
                           "big_endian": np.arange(3, dtype=">i4")})
  header, data = _header(path)
  bf16_bits = (exact.view(np.uint32) >> 16).astype("<u2").tobytes()
  assert data[slice(*header["b"]["data_offsets"])] == bf16_bits
  assert data[slice(*header["h"]["data_offsets"])] == bytes.fromhex("003c00c0")  # IEEE half 1.0, -2.0
  assert data[slice(*header["big_endian"]["data_offsets"])] == bytes.fromhex("000000000100000002000000")
  out = read_safetensors(path)
  np.testing.assert_array_equal(out["b"], exact)
  np.testing.assert_array_equal(out["big_endian"], [0, 1, 2])
  # A file written elsewhere: a BF16 tensor after another one, and __metadata__, which is not a tensor.
  header = json.dumps({"__metadata__": {"format": "pt"},
                       "x": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
                       "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [4, 12]}}).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + struct.pack("<i", 7) + bf16_bits)
  out = read_safetensors(path)
  assert set(out) == {"x", "b"} and out["x"].tolist() == [7]
  np.testing.assert_array_equal(out["b"], exact.reshape(2, 2))


def test_safetensors_unknown_dtypes_are_named(tmp_path):
  path = str(tmp_path / "t.safetensors")
  with pytest.raises(ValueError, match="tensor 'c' has dtype complex64"):
    write_safetensors(path, {"c": np.zeros(2, np.complex64)})
  header = json.dumps({"f8": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + b"\0")
  with pytest.raises(ValueError, match="tensor 'f8' has dtype F8_E4M3"):
    read_safetensors(path)


# ---------------------------------------------------------------- PyTorch .pth without torch

class _Storage:
  """A storage as torch.save sees it: a key, a storage class name and its flat data."""

  def __init__(self, key, kind, data):
    self.key, self.kind, self.data = key, kind, np.ascontiguousarray(data)


class _Tensor:
  """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return _rebuild_tensor_v2, self.args


def _rebuild_tensor_v2(*args):
  raise AssertionError("only pickled, never called")


class _TorchPickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):  # what torch.save writes for a storage: ('storage', class, key, location, numel)
      return "storage", getattr(self.torch, obj.kind), obj.key, "cpu", obj.data.size
    return None


def torch_save(path, state_dict, legacy):
  """Write `state_dict` (of _Tensor) as torch.save does, in the zip or the legacy format, without torch."""
  storages = {t.args[0].key: t.args[0] for t in state_dict.values()}
  fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for kind in {s.kind for s in storages.values()}:
    setattr(fake_torch, kind, type(kind, (), {"__module__": "torch"}))

  def dump(obj, f):
    pickler = _TorchPickler(f, protocol=2)  # torch.save's protocol
    pickler.torch = fake_torch
    pickler.dump(obj)

  # pickle writes a global as module + name after checking that it imports: stand-in modules hold them.
  with pytest.MonkeyPatch.context() as m, open(path, "wb") as f:
    m.setattr(_rebuild_tensor_v2, "__module__", "torch._utils")
    m.setitem(sys.modules, "torch", fake_torch)
    m.setitem(sys.modules, "torch._utils", fake_utils)
    if legacy:
      for header in (0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True}):
        dump(header, f)
      dump(collections.OrderedDict(state_dict), f)
      dump(list(storages), f)
      for storage in storages.values():
        f.write(struct.pack("<q", storage.data.size) + storage.data.tobytes())
    else:
      with zipfile.ZipFile(f, "w") as zf:
        pkl = io.BytesIO()
        dump(collections.OrderedDict(state_dict), pkl)
        zf.writestr("archive/data.pkl", pkl.getvalue())
        for key, storage in storages.items():
          zf.writestr(f"archive/data/{key}", storage.data.tobytes())
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_reader_rebuilds_strided_views_of_shared_storages(tmp_path, legacy):
  rng = np.random.default_rng(0)
  floats = rng.normal(size=30).astype(np.float32)
  shared = _Storage("0", "FloatStorage", floats)
  exact = np.array([1.0, -2.5, 0.15625, 3.0], np.float32)
  state = {
      "conv.weight": _Tensor(shared, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
      "linear.weight": _Tensor(shared, 24, (3, 2), (1, 3)),  # a transposed view at an offset
      "bn.num_batches_tracked": _Tensor(_Storage("1", "LongStorage", np.array([7])), 0, (), ()),
      "half": _Tensor(_Storage("2", "HalfStorage", np.array([1.0, -0.5], np.float16)), 1, (1,), (1,)),
      "bf16": _Tensor(_Storage("3", "BFloat16Storage", (exact.view(np.uint32) >> 16).astype(np.uint16)), 0, (2, 2),
                      (2, 1)),
      "mask": _Tensor(_Storage("4", "BoolStorage", np.array([True, False, True])), 0, (3,), (1,)),
  }
  path = str(tmp_path / "w.pth")
  torch_save(path, state, legacy)
  assert zipfile.is_zipfile(path) != legacy
  out = load_torch_state_dict(path)
  assert list(out) == list(state)
  np.testing.assert_array_equal(out["conv.weight"], floats[:24].reshape(2, 3, 2, 2))
  np.testing.assert_array_equal(out["linear.weight"], floats[24:].reshape(2, 3).T)
  assert out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"].shape == ()
  assert int(out["bn.num_batches_tracked"]) == 7
  assert out["half"].dtype == np.float16 and out["half"].tolist() == [-0.5]
  assert out["bf16"].dtype == np.float32
  np.testing.assert_array_equal(out["bf16"], exact.reshape(2, 2))
  assert out["mask"].tolist() == [True, False, True]
  out["linear.weight"][0, 0] = 0.0  # each tensor owns its memory, not a view of the file's bytes
  assert load_torch_state_dict(path)["linear.weight"][0, 0] == floats[24]


def test_pth_reader_refuses_objects_other_than_tensors(tmp_path):
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="unexpected object posix.getcwd|unexpected object nt.getcwd"):
    load_torch_state_dict(path)


@pytest.mark.slow  # the slow tier installs torch (README); the default tier has no torch
def test_pth_reader_reads_what_torch_saves(tmp_path):
  """With torch installed: both of torch.save's formats, against the tensors saved."""
  torch = pytest.importorskip("torch")
  state = {"w": torch.randn(3, 4).t(), "b": torch.arange(5, dtype=torch.int64)[1:],
           "h": torch.randn(2, dtype=torch.bfloat16)}
  for legacy in (False, True):
    path = str(tmp_path / f"w{legacy}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    out = load_torch_state_dict(path)
    for key, value in state.items():
      np.testing.assert_array_equal(out[key], value.float().numpy() if key == "h" else value.numpy(), err_msg=key)


# ---------------------------------------------------------------- downloads

def test_offline_download_is_one_file_not_found_error_and_leaves_no_part_file(tmp_path, monkeypatch):
  url = "https://example.org/weights/model.bin"

  def broken(url, filename):  # the connection drops after some bytes were written
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("[Errno 101] Network is unreachable")

  monkeypatch.setattr(urllib.request, "urlretrieve", broken)
  path = str(tmp_path / "cache" / "model.bin")
  with pytest.raises(FileNotFoundError) as e:
    download.download_file(url, path, what_to_do_offline="copy it there by hand")
  assert str(e.value) == f"could not download {url} ([Errno 101] Network is unreachable); copy it there by hand"
  assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
  assert os.listdir(tmp_path / "cache") == []


def test_download_writes_once_and_atomically(tmp_path, monkeypatch):
  source = tmp_path / "source.bin"
  source.write_bytes(b"weights")
  url = source.as_uri()  # urlretrieve itself, through a file:// URL, with no network
  calls = []
  real = urllib.request.urlretrieve

  def counting(url, filename):
    calls.append(filename)
    return real(url, filename)

  monkeypatch.setattr(urllib.request, "urlretrieve", counting)
  path = str(tmp_path / "cache" / "sub" / "w.bin")
  assert download.download_file(url, path, what_to_do_offline="-") == path
  assert calls == [path + ".part"]
  assert open(path, "rb").read() == b"weights" and os.listdir(os.path.dirname(path)) == ["w.bin"]
  source.write_bytes(b"changed")
  assert download.download_file(url, path, what_to_do_offline="-") == path and len(calls) == 1  # cached
  with pytest.raises(FileNotFoundError, match="could not download file://.*missing.bin .*; do this"):
    download.download_file((tmp_path / "missing.bin").as_uri(), str(tmp_path / "m.bin"),
                           what_to_do_offline="do this")
  with pytest.raises(FileNotFoundError, match="gs://bucket/w.bin does not exist and .* is only downloaded to local"):
    download.download_file(url, "gs://bucket/w.bin", what_to_do_offline="upload it")
  assert not os.path.exists("gs:")


def test_download_from_hub_fills_the_cache_and_says_what_to_do_offline(tmp_path, monkeypatch):
  fetched = []

  def fake(url, filename):
    fetched.append(url)
    with open(filename, "w") as f:
      f.write(url)

  monkeypatch.setattr(urllib.request, "urlretrieve", fake)
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
  directory = download.download_from_hub("org/model", ["config.json", "model.safetensors"])
  assert directory == str(tmp_path / "cache" / "hub" / "org--model")
  assert fetched == ["https://huggingface.co/org/model/resolve/main/config.json",
                     "https://huggingface.co/org/model/resolve/main/model.safetensors"]
  assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
  hub = str(tmp_path / "cache" / "hub")
  assert download.download_from_hub("org/model", ["config.json"], cache_dir=hub) == directory
  assert len(fetched) == 2  # already there

  def offline(url, filename):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlretrieve", offline)
  with pytest.raises(FileNotFoundError, match=r"could not download https://huggingface.co/org/other/resolve/main/"
                                              r"tokenizer.json \(<urlopen error .*>\); without internet, download "
                                              r"org/other elsewhere and set config.text.model_dir"):
    download.download_from_hub("org/other", ["tokenizer.json"], cache_dir=str(tmp_path / "hub"))
  assert os.listdir(tmp_path / "hub" / "org--other") == []
