"""Parity of the Flax FID Inception with an independent PyTorch Inception of the same
architecture (written here, random weights, pytorch-fid key names), and preprocessing checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

from ppflow_jax.convert import inception as inception_weights  # noqa: E402
from ppflow_jax.convert.torch_io import CheckpointMismatchError  # noqa: E402
from ppflow_jax.evaluation import inception  # noqa: E402


class Conv(nn.Module):
  """conv(no bias) + BN(eps 1e-3) + ReLU, keys `conv.weight`, `bn.*` as pytorch-fid."""

  def __init__(self, cin, cout, k, s=1, p=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=1e-3)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg3(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):

  def __init__(self, cin, pf):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1)
    self.branch_pool = Conv(cin, pf, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg3(x))], 1)


class B(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, 3, s=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2)], 1)


class C(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, 1)
    self.branch7x7_1 = Conv(cin, c7, 1)
    self.branch7x7_2 = Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, (7, 1), p=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, 1)
    self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), p=(0, 3))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    d = x
    for i in range(1, 6):
      d = getattr(self, f'branch7x7dbl_{i}')(d)
    s = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    return torch.cat([self.branch1x1(x), s, d, self.branch_pool(avg3(x))], 1)


class D(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
    self.branch7x7x3_1 = Conv(cin, 192, 1)
    self.branch7x7x3_2 = Conv(192, 192, (1, 7), p=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, (7, 1), p=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, 3, s=2)

  def forward(self, x):
    b = x
    for i in range(1, 5):
      b = getattr(self, f'branch7x7x3_{i}')(b)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):

  def __init__(self, cin, use_max):
    super().__init__()
    self.use_max = use_max
    self.branch1x1 = Conv(cin, 320, 1)
    self.branch3x3_1 = Conv(cin, 384, 1)
    self.branch3x3_2a = Conv(384, 384, (1, 3), p=(0, 1))
    self.branch3x3_2b = Conv(384, 384, (3, 1), p=(1, 0))
    self.branch3x3dbl_1 = Conv(cin, 448, 1)
    self.branch3x3dbl_2 = Conv(448, 384, 3, p=1)
    self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    a = self.branch3x3_1(x)
    b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    p = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max else avg3(x)
    return torch.cat([
        self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
        self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(p)], 1)


class TorchFIDInception(nn.Module):
  """pytorch-fid's architecture and preprocessing (interpolate bilinear, 2x - 1)."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Conv(3, 32, 3, s=2)
    self.Conv2d_2a_3x3 = Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = Conv(32, 64, 3, p=1)
    self.Conv2d_3b_1x1 = Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
    self.fc = nn.Linear(2048, 1008)
    self.spatial = None
    self.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: setattr(self, 'spatial', o))

  def forward(self, images_nchw_0_255):
    x = F.interpolate(images_nchw_0_255 / 255, size=(299, 299), mode='bilinear',
                      align_corners=False)
    x = 2 * x - 1
    x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    pool = x.mean(dim=(2, 3))
    # ADM: spatial[..., :7] of the NHWC tensor, flattened.
    spatial = self.spatial[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
    return pool, spatial, pool @ self.fc.weight.T


@pytest.fixture(scope='module')
def torch_model_file(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):  # Non-trivial running statistics and affine.
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  path = tmp_path_factory.mktemp('w') / 'pt_inception-random.pth'
  torch.save(model.state_dict(), path)
  return model, str(path)


def _rel_err(a, b):
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def test_parity_with_pytorch(torch_model_file):
  model, path = torch_model_file
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
  with torch.no_grad():
    t_pool, t_spatial, t_logits = (
        t.numpy() for t in model(torch.from_numpy(images).permute(0, 3, 1, 2).float()))
  flax_model = inception_weights.load_pytorch_fid_weights(path)
  out = inception.extract_features(flax_model, [images], batch_size=2)
  assert out['pool'].shape == (2, 2048) and out['spatial'].shape == (2, 17 * 17 * 7)
  assert out['logits'].shape == (2, 1008)
  assert np.abs(t_pool).max() > 1e-3 and np.abs(t_spatial).max() > 1e-3  # Not degenerate.
  assert _rel_err(out['pool'], t_pool) < 1e-4
  assert _rel_err(out['spatial'], t_spatial) < 1e-4
  assert _rel_err(out['logits'], t_logits) < 1e-4


def test_importer_reports_bad_keys(torch_model_file, tmp_path):
  model, _ = torch_model_file
  sd = dict(model.state_dict())
  sd.pop('Mixed_7c.branch_pool.conv.weight')
  sd['AuxLogits.fc.weight'] = torch.zeros(3)
  sd['fc.weight'] = torch.zeros(1000, 2048)
  path = tmp_path / 'bad.pth'
  torch.save(sd, path)
  with pytest.raises(CheckpointMismatchError) as e:  # the one class of every importer
    inception_weights.load_pytorch_fid_weights(str(path))
  msg = str(e.value)
  assert 'Mixed_7c.branch_pool.conv.weight' in msg and 'AuxLogits.fc.weight' in msg
  assert 'fc.weight: file (1000, 2048)' in msg


def test_safetensors_import_matches_pth(torch_model_file, tmp_path):
  from safetensors.torch import save_file
  model, path = torch_model_file
  st = tmp_path / 'w.safetensors'
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
  a = inception_weights.load_pytorch_fid_weights(path)
  b = inception_weights.load_pytorch_fid_weights(str(st))
  np.testing.assert_array_equal(np.asarray(a.Mixed_6d.branch1x1.conv.kernel[...]),
                                np.asarray(b.Mixed_6d.branch1x1.conv.kernel[...]))


@pytest.mark.parametrize('size', [(32, 32), (256, 200), (400, 500)])
def test_pytorch_fid_resize_matches_interpolate(size):
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 255, size=(1, *size, 3)).astype(np.float32)
  ours = np.asarray(inception.preprocess(x, 'pytorch_fid'))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2) / 255, size=(299, 299),
                      mode='bilinear', align_corners=False) * 2 - 1
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_tf1_resize_formula():
  # TF1 resize_bilinear(align_corners=False): out[i] = lerp at source i * in / out.
  x = np.arange(4, dtype=np.float32)
  m = inception._resize_matrix(4, 6, 'tf1')
  np.testing.assert_allclose(m @ x, [0, 2 / 3, 4 / 3, 2, 8 / 3, 3], atol=1e-6)
  img = np.full((1, 5, 7, 3), 128, np.uint8)
  np.testing.assert_allclose(np.asarray(inception.preprocess(img, 'tf1')), 0.0, atol=1e-6)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match='RGB'):
    inception.preprocess(np.zeros((1, 32, 32, 1), np.uint8))
  with pytest.raises(FileNotFoundError, match='pt_inception'):
    inception_weights.load_pytorch_fid_weights('/nonexistent/weights.pth')


@pytest.mark.slow
def test_evaluate_end_to_end(torch_model_file, tmp_path):
  from ppflow_jax.evaluation import evaluate, metrics
  _, path = torch_model_file
  rng = np.random.default_rng(2)
  ref_images = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
  # Batch size 3 everywhere (5 images: one padded batch) so one program is compiled; the
  # preprocessing of evaluate()'s default (ADM's).
  model = inception_weights.load_pytorch_fid_weights(path, preprocess_mode=inception.ADM_PREPROCESS)
  feats = inception.extract_features(model, [ref_images[:3], ref_images[3:]], 3)
  mu, sigma = metrics.feature_stats(feats['pool'])
  mu_s, sigma_s = metrics.feature_stats(feats['spatial'])
  ref_path, same_path, other_path = (str(tmp_path / n) for n in ('r.npz', 's.npz', 'o.npz'))
  np.savez(ref_path, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  np.savez(same_path, ref_images)
  other_images = (ref_images // 4 + 160).astype(np.uint8)
  np.savez(other_path, other_images)
  same = evaluate.evaluate(same_path, ref_path, path, batch_size=3)
  assert abs(same['fid']) < 1e-3 and abs(same['sfid']) < 1e-3
  assert same['precision'] == 1.0 and same['recall'] == 1.0 and same['num_samples'] == 5
  assert same['inception_score'] == pytest.approx(
      metrics.inception_score(feats['logits'], splits=1), rel=1e-5)
  assert (same['preprocess'], same['pr_distances'], same['is_split_size']) == (
      'tf1', 'float16', 5000)
  other = evaluate.evaluate(other_path, ref_path, path, batch_size=3)
  # Random weights give tiny feature variances, so compare with a direct computation.
  other_feats = inception.extract_features(model, [other_images[:3], other_images[3:]], 3)
  expected_fid = metrics.fid(*metrics.feature_stats(other_feats['pool']), mu, sigma)
  expected_sfid = metrics.fid(*metrics.feature_stats(other_feats['spatial']), mu_s, sigma_s)
  assert expected_fid > 1e6 * abs(same['fid']) and expected_sfid > 1e6 * abs(same['sfid'])
  assert other['fid'] == pytest.approx(expected_fid, rel=1e-3)
  assert other['sfid'] == pytest.approx(expected_sfid, rel=1e-3)
  assert 0.0 <= other['precision'] <= 1.0 and 0.0 <= other['recall'] <= 1.0
