"""Importer of pytorch-fid's Inception weights (`pt_inception-2015-12-05-*.pth`) into the FID
`evaluation.inception.InceptionV3`, read by the one safe reader (`torch_io.read_state_dict`)."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from ppflow_jax.convert import torch_io
from ppflow_jax.evaluation.inception import InceptionV3

# NNX variable name -> PyTorch state-dict suffix.
_TORCH_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}


def load_pytorch_fid_weights(path: str, *, preprocess_mode: str = 'pytorch_fid',
                             logits_bias: bool = False) -> InceptionV3:
  """Builds an `InceptionV3` with the weights of pytorch-fid's `pt_inception-2015-12-05-*.pth`.

  Accepts the `.pth` state dict (read with `torch.load(weights_only=True)`) or a `.safetensors`
  file with the same keys. Conv kernels are transposed OIHW -> HWIO, the fc weight to (in, out);
  `num_batches_tracked` buffers are ignored. Any missing, unexpected or mis-shaped key is an
  error that lists them all.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Inception weights {path!r} not found. Supply pytorch-fid\'s '
        'pt_inception-2015-12-05-6726825d.pth (from the pytorch-fid GitHub release "fid_weights") '
        'or a .safetensors conversion of it.')
  sd = torch_io.read_state_dict(path)
  abstract = nnx.eval_shape(lambda: InceptionV3(preprocess_mode=preprocess_mode,
                                                logits_bias=logits_bias, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  used, missing, mismatched, leaves = set(), [], [], []
  for path_, var in flat:
    shape = var.get_value().shape
    *prefix, name = (str(p) for p in path_)
    torch_name = 'weight' if name == 'kernel' else _TORCH_NAMES[name]
    key = '.'.join([*prefix, torch_name])
    if key not in sd:
      missing.append(key)
      leaves.append((path_, var))
      continue
    used.add(key)
    w = sd[key]
    if name == 'kernel':
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    if w.shape != shape:
      mismatched.append(f'{key}: file {sd[key].shape} -> {w.shape}, model needs {shape}')
    leaves.append((path_, var.replace(jnp.asarray(w, jnp.float32))))
  unexpected = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
  if missing or unexpected or mismatched:
    raise torch_io.CheckpointMismatchError(
        f'{path} does not match the FID Inception (pytorch-fid fid_inception_v3; torchvision\'s '
        f'ImageNet Inception weights are a different model).\n  missing ({len(missing)}): '
        f'{missing[:20]}\n  unexpected ({len(unexpected)}): {unexpected[:20]}\n  mismatched '
        f'({len(mismatched)}): {mismatched[:20]}')
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))
