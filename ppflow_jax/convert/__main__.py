"""CLI: convert a PyTorch SiT/DiT/PPFlow weight file into an orbax params checkpoint.

  python -m ppflow_jax.convert --config=configs/ppf_xl_2.py \
      --torch_checkpoint=SiT-XL-2-256x256.pt --workdir=DIR --init_from_sit

writes DIR/converted_params (params only, the pure-dict layout of `PPFModel(config)`); train from
it with `python -m ppflow_jax.main --config=<same config> --config.train.init_from=DIR ...`.
"""

from __future__ import annotations

import math

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ppflow_jax import cli
from ppflow_jax import config_lib
from ppflow_jax import convert
from ppflow_jax import weights

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config of the target model.')
_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None,
                                  'A .pt/.pth/.bin (loaded with weights_only=True) or '
                                  '.safetensors SiT/DiT/official PPFlow weight file, a released '
                                  'name (PPF-XL-2.pt, SiT-XL-2-256x256.pt, ...) or a URL.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output: DIR/converted_params is written.')
_INIT_FROM_SIT = flags.DEFINE_bool(
    'init_from_sit', False,
    'Initialise a multi-stage PPF from a SiT/DiT file (paper §3.3) instead of a direct load.')
flags.mark_flags_as_required(['config', 'torch_checkpoint', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = config_lib.resolve(_CONFIG.value)
  path = weights.resolve(_CHECKPOINT.value)  # a file, or a released name / URL to download
  if _INIT_FROM_SIT.value:
    params = convert.init_from_sit(path, config)
  else:
    params = convert.load_torch_checkpoint(path, config)
  out = convert.save_params(params, _WORKDIR.value)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  logging.info('wrote %s (%d parameters) from %s; train with --config.train.init_from=%s',
               out, count, path, _WORKDIR.value)
  print(out)


def console() -> None:
  cli.run(main)


if __name__ == '__main__':
  console()
