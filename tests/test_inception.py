"""The Flax FID Inception against a PyTorch reference in pytorch-fid's layout, through a real .pth file.

The tests that build the PyTorch reference are in the slow tier (needs torch: `pip install torch==2.13.0`):
`bash launch/run_tests.sh -m slow`. The weight file's messages are checked without torch.
"""

import os
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

from diffusion_jax.evaluation import inception as I
from diffusion_jax.weights.torch_pickle import load_torch_state_dict


def torch_fid_inception():
  """pytorch-fid's FID Inception-v3 (torchvision blocks + FID patches), written out with torch.nn."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class Conv(nn.Module):
    def __init__(self, cin, cout, k, s=1, p=0):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  class A(nn.Module):
    def __init__(self, cin, pf):
      super().__init__()
      self.branch1x1 = Conv(cin, 64, 1)
      self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
      self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
      self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3, p=1), Conv(cin, pf, 1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class B(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Conv(cin, 384, 3, s=2)
      self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, s=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, 2)], 1)

  class C(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = Conv(cin, 192, 1)
      self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, (1, 7), p=(0, 3))
      self.branch7x7_3 = Conv(c7, 192, (7, 1), p=(3, 0))
      self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, (7, 1), p=(3, 0))
      self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, (1, 7), p=(0, 3)), Conv(c7, c7, (7, 1), p=(3, 0))
      self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, (1, 7), p=(0, 3)), Conv(cin, 192, 1)

    def forward(self, x):
      d = x
      for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                self.branch7x7dbl_5):
        d = m(d)
      return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                        self.branch_pool(avg(x))], 1)

  class D(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
      self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), p=(0, 3))
      self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), p=(3, 0)), Conv(192, 192, 3, s=2)

    def forward(self, x):
      b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

  class E(nn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = Conv(cin, 320, 1)
      self.branch3x3_1 = Conv(cin, 384, 1)
      self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
      self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
      self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
      self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
      self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3)
      self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, p=1), Conv(64, 80, 1)
      self.Conv2d_4a_3x3 = Conv(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # x [B,3,H,W] in [0,1], as pytorch-fid's InceptionV3
      x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
      x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
      x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{name}")(x)
      return x.mean((2, 3))

  torch.manual_seed(0)
  net = Net().eval()
  with torch.no_grad():  # non-trivial running statistics, so BatchNorm's conversion is exercised
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.1, 0.1)
  return net


@pytest.fixture(scope="module")
def torch_net():
  try:
    import torch  # noqa: F401  (only checks that torch is installed)
  except ImportError:
    pytest.fail("this slow test needs torch: pip install torch==2.13.0")
  return torch_fid_inception()


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True])
def test_pth_loader_reads_both_torch_formats(torch_net, tmp_path, legacy):
  import torch
  path = str(tmp_path / "w.pth")
  torch.save(torch_net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  loaded = load_torch_state_dict(path)
  for key, value in torch_net.state_dict().items():
    np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)


@pytest.mark.slow
def test_flax_port_matches_torch_pool3_features(torch_net, tmp_path):
  import torch
  path = str(tmp_path / I.FID_WEIGHTS_NAME)
  torch.save(torch_net.state_dict(), path, _use_new_zipfile_serialization=False)
  variables = I.load_inception_variables(path, download=False)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    ref = torch_net(torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)).numpy()
  feats = I.make_inception_fn(variables, batch_size=4)(images)
  assert feats.shape == (4, 2048)
  np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # Deterministic, and grey images go through as 3 equal channels.
  np.testing.assert_array_equal(I.make_inception_fn(variables, batch_size=4)(images), feats)
  grey = images[..., :1]
  np.testing.assert_allclose(I.make_inception_fn(variables, batch_size=4)(grey),
                             I.make_inception_fn(variables, batch_size=4)(np.repeat(grey, 3, -1)), rtol=1e-6)


def test_missing_weights_say_where_to_put_them(tmp_path):
  path = str(tmp_path / "nope.pth")
  message = f"not at {path}: download {I.FID_WEIGHTS_URL} and put it at {path}, or point DIFFUSION_JAX_INCEPTION"
  with pytest.raises(FileNotFoundError, match=re.escape(message)):
    I.load_inception_variables(path, download=False)


def test_offline_download_says_where_to_put_the_weights(tmp_path, monkeypatch):
  def offline(url, filename):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlretrieve", offline)
  path = str(tmp_path / "cache" / I.FID_WEIGHTS_NAME)
  with pytest.raises(FileNotFoundError) as e:
    I.load_inception_variables(path)
  assert str(e.value).startswith(f"could not download {I.FID_WEIGHTS_URL} (<urlopen error [Errno -3]")
  assert f"without internet, download it elsewhere and put it at {path}" in str(e.value)
  assert os.listdir(tmp_path / "cache") == []


@pytest.mark.slow
def test_fid_in_the_evaluation_uses_cached_reference_stats(torch_net, tmp_path):
  import torch
  from diffusion_jax.evaluation import evaluate
  from helpers import tiny_config, write_fake_fashion_mnist
  weights = str(tmp_path / I.FID_WEIGHTS_NAME)
  torch.save(torch_net.state_dict(), weights)
  data_dir = write_fake_fashion_mnist(str(tmp_path), n_train=16, n_test=8)
  config = tiny_config(data_dir)
  config.eval.inception_weights = weights
  images = np.random.default_rng(1).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
  out = evaluate.fid(config, images, str(tmp_path / "run"))
  stats = str(tmp_path / "run" / "eval" / "fid_stats_fashion_mnist_test.npz")
  mu, sigma = evaluate.load_reference_stats(stats)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  assert out["fid"] > out["floor/fid"] > 0  # noise images are further from the data than real ones
  config.eval.fid_reference_stats = stats
  assert evaluate.fid(config, images, str(tmp_path / "other"))["fid"] == pytest.approx(out["fid"], rel=1e-9)
