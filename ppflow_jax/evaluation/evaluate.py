"""Command-line ADM-style evaluation of a sample batch against a reference batch: FID, sFID,
Inception Score, improved precision and recall, without TensorFlow.

  python -m ppflow_jax.evaluation.evaluate --samples=SAMPLES.npz \
      --reference=VIRTUAL_imagenet256_labeled.npz \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth --out=metrics.json

As ADM's `evaluator.py`: FID / sFID of the samples' pool_3 / spatial statistics against the
reference `mu, sigma` / `mu_s, sigma_s`; IS over chunks of 5000 samples; precision / recall with
k = 3 between the pool_3 features of the reference images (`arr_0`) and of the samples, with
float16 distances (float32 where a block overflows). Defaults are the ADM-closest choices
(`--preprocess=tf1`, `--pr_distances=float16`, `--is_split_size=5000`); docs/evaluation.md says
how close the numbers are to ADM's TensorFlow suite.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from ppflow_jax import cli
from ppflow_jax import paths
from ppflow_jax.convert import inception as inception_weights
from ppflow_jax.evaluation import inception, metrics


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  flags.DEFINE_string('samples', None, 'ADM sample batch .npz (uint8 NHWC arr_0).')
  flags.DEFINE_string('reference', None,
                      'ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0).')
  flags.DEFINE_string('inception_weights', None,
                      "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors copy).")
  flags.DEFINE_string('out', '', 'Optional JSON file for the metrics.')
  flags.DEFINE_integer('batch_size', 100, 'Images per Inception forward pass.')
  flags.DEFINE_enum('preprocess', inception.ADM_PREPROCESS, list(inception.PREPROCESS_MODES),
                    "Resize + scaling before Inception: 'tf1' emulates the ops of ADM's TF graph "
                    "(ADM-closest), 'pytorch_fid' is pytorch-fid's.")
  flags.DEFINE_integer('is_split_size', metrics.ADM_IS_SPLIT_SIZE,
                       'Samples per IS split (ADM: 5000).')
  flags.DEFINE_enum('pr_distances', 'float16', list(metrics.PR_DISTANCES),
                    'Precision/recall distance precision (ADM: float16 with a float32 fallback '
                    'on overflow).')


def evaluate(samples_path: str, reference_path: str, weights_path: str, batch_size: int = 100,
             preprocess: str = inception.ADM_PREPROCESS,
             is_split_size: int = metrics.ADM_IS_SPLIT_SIZE,
             pr_distances: str = 'float16') -> dict:
  """Returns {fid, sfid, inception_score, precision, recall, num_samples, ...} (floats, ints)."""
  ref = metrics.load_reference_batch(reference_path)
  model = inception_weights.load_pytorch_fid_weights(weights_path, preprocess_mode=preprocess)
  logging.info('Inception features of %s ...', samples_path)
  feats = inception.extract_features(model, metrics.iter_images(samples_path, batch_size),
                                     batch_size)
  mu, sigma = metrics.feature_stats(feats['pool'])
  mu_s, sigma_s = metrics.feature_stats(feats['spatial'])
  if ref.mu.shape != mu.shape or ref.mu_s.shape != mu_s.shape:
    raise ValueError(f'{reference_path}: mu {ref.mu.shape} / mu_s {ref.mu_s.shape} do not match '
                     f'the Inception pool_3 {mu.shape} / spatial {mu_s.shape} features')
  result = dict(
      fid=metrics.fid(mu, sigma, ref.mu, ref.sigma),
      sfid=metrics.fid(mu_s, sigma_s, ref.mu_s, ref.sigma_s),
      inception_score=metrics.inception_score(feats['logits'], split_size=is_split_size),
      precision=None, recall=None,
      num_samples=len(feats['pool']), num_reference_images=ref.num_images,
      preprocess=preprocess, is_split_size=is_split_size, pr_distances=pr_distances,
      inception_weights=os.path.basename(weights_path))
  if ref.num_images:
    logging.info('Inception features of the %d reference images ...', ref.num_images)
    ref_pool = inception.extract_features(model, ref.iter_images(batch_size), batch_size)['pool']
    result['precision'], result['recall'] = metrics.precision_recall(ref_pool, feats['pool'], k=3,
                                                                  distances=pr_distances)
  else:
    logging.warning('%s has no images (arr_0): precision/recall not computed.', reference_path)
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ('samples', 'reference', 'inception_weights'):
    if not f[name].value:
      raise app.UsageError(f'--{name} is required')
  result = evaluate(f.samples, f.reference, f.inception_weights, f.batch_size, f.preprocess,
                    f.is_split_size, f.pr_distances)
  text = json.dumps(result, indent=2)
  print(text)
  if f.out:
    paths.write_text(f.out, text + '\n')  # a local path or a URL (gs://...)


def console() -> None:
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
