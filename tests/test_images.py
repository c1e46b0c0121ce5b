"""Sample grids: the plain tiling, the captioned one, and the PNG writer."""

import zlib

import numpy as np

from diffusion_jax import images as I


def _read_png(path):
  """A minimal PNG reader for 8-bit images written with filter 0 (what write_png writes)."""
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, chunks = 8, {}
  while pos < len(data):
    n = int.from_bytes(data[pos:pos + 4], "big")
    tag = data[pos + 4:pos + 8]
    chunks[tag] = chunks.get(tag, b"") + data[pos + 8:pos + 8 + n]
    pos += 12 + n
  w, h = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
  channels = {0: 1, 2: 3, 6: 4}[chunks[b"IHDR"][9]]
  raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
  assert (raw[:, 0] == 0).all()
  return raw[:, 1:].reshape(h, w, channels)


def test_make_grid_and_png_roundtrip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3)).astype(np.uint8)
  grid = I.make_grid(images, ncol=2, pad=1)
  assert grid.shape == (3 * 5 + 1, 2 * 4 + 1, 3)
  np.testing.assert_array_equal(grid[1 + 2 * 5:1 + 2 * 5 + 4, 1:4], images[4])
  path = str(tmp_path / "g.png")
  I.write_png(path, grid)
  np.testing.assert_array_equal(_read_png(path), grid)


def test_captioned_grid_wraps_each_caption_onto_its_own_rows():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 255, (40, 8, 8, 1)).astype(np.uint8)
  captions = np.array(["a"] * 20 + ["bb"] * 5 + ["a"] * 3 + ["c"] * 12)
  grid = I.captioned_grid(images, captions, pad=2, max_per_row=10)
  assert grid.shape[0] == 6 * (8 + 2) + 2 and grid.shape[-1] == 1  # a: 23 -> 3 rows, bb: 1, c: 2
  # The last image of caption "a" (index 27) is the 3rd of its third row; find it right-aligned in the image area.
  image_area = grid[..., 0][:, grid.shape[1] - (10 * 10 + 2):]
  top, left = 2 + 2 * 10, 2 + 2 * 10
  np.testing.assert_array_equal(image_area[top:top + 8, left:left + 8], images[27, ..., 0])
  text_area = grid[..., 0][:, :grid.shape[1] - (10 * 10 + 2)]
  assert (text_area[2:10] < 128).any() and (text_area[12:20] == 255).all()  # caption on the first row only
