"""diffusion_jax.images: the plain grid, the captioned grid, the PNG writer (decoded by Pillow) and to_uint8."""

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import images as I


def read_png(path):
  """Decoded by Pillow, an independent reader that also checks the chunk CRCs and the zlib stream."""
  with Image.open(path) as im:
    assert im.format == "PNG"
    im.load()
    return im.mode, np.asarray(im)


def test_make_grid_and_png_roundtrip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3)).astype(np.uint8)
  grid = I.make_grid(images, ncol=2, pad=1)
  assert grid.shape == (3 * 5 + 1, 2 * 4 + 1, 3)
  np.testing.assert_array_equal(grid[1 + 2 * 5:1 + 2 * 5 + 4, 1:4], images[4])
  assert (grid[:, 0] == 255).all() and (grid[1 + 2 * 5:, 1 + 4 + 1:] == 255).all()  # padding and the empty slot
  path = str(tmp_path / "g.png")
  I.write_png(path, grid)
  mode, pixels = read_png(path)
  assert mode == "RGB"
  np.testing.assert_array_equal(pixels, grid)


@pytest.mark.parametrize("shape,mode", [((7, 5), "L"), ((7, 5, 1), "L"), ((7, 5, 3), "RGB"), ((7, 5, 4), "RGBA")])
def test_png_pixels_decode_to_the_array_written(tmp_path, shape, mode):
  image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
  image.flat[:2] = (0, 255)  # both extremes survive
  path = tmp_path / "x.png"
  I.write_png(path, image)
  got_mode, pixels = read_png(path)
  assert got_mode == mode
  np.testing.assert_array_equal(pixels, image.reshape(pixels.shape))
  assert pixels.shape[:2] == (7, 5)  # rows are the height
  with pytest.raises(ValueError, match=r"write_png needs .* uint8, got \(7, 5, 2\)"):
    I.write_png(tmp_path / "bad.png", np.zeros((7, 5, 2), np.uint8))


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(I.to_uint8(np.array([-2.0, -1.0, -0.5, 0.0, 1 / 255, 1.0, 3.0])),
                                [0, 0, 64, 128, 128, 255, 255])


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
