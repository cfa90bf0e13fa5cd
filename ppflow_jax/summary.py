"""Where a training run's numbers go: `metrics.jsonl` and TensorBoard event files.

`RunWriter(workdir, enabled)` is process 0's sink (other processes pass enabled=False and write
nothing): each logged step becomes one JSON line in `workdir/metrics.jsonl` and scalars in
`workdir/tensorboard/` (tensorboardX: no TensorFlow needed; `tensorboard --logdir=WORKDIR` reads
it). Sample grids become TensorBoard images. Both work on local paths and URLs (paths.py).

`step_rates(...)` turns a logging interval into images/s and an *estimated* MFU: analytic training
FLOPs per image (flops.training_flops: 3 x forward, stage buckets, no packing padding) times
images/s over the bf16 dense peak of the devices (bench/common.py's table; no MFU where the peak is
unknown, e.g. CPU).
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from ppflow_jax import paths

METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'


def training_flops_per_image(config: ml_collections.ConfigDict) -> float | None:
  """Analytic training FLOPs per image; None for a model variant flops.py does not count."""
  from ppflow_jax import flops  # pylint: disable=g-import-not-at-top
  try:
    return float(flops.training_flops(config)['flops_per_image'])
  except ValueError:  # no count registered for this variant
    return None


def step_rates(config: ml_collections.ConfigDict, steps: int, seconds: float,
               flops_per_image: float | None) -> dict:
  """{steps_per_sec, images_per_sec[, mfu_estimate]} of `steps` steps taking `seconds`."""
  from ppflow_jax.bench import common  # pylint: disable=g-import-not-at-top
  steps_per_sec = steps / max(seconds, 1e-9)
  images_per_sec = steps_per_sec * config.train.batch_size
  out = dict(steps_per_sec=steps_per_sec, images_per_sec=images_per_sec)
  dev = jax.devices()[0]
  peak = None if dev.platform == 'cpu' else common.peak_bf16_flops(dev.device_kind)
  if peak and flops_per_image:
    out['mfu_estimate'] = images_per_sec * flops_per_image / (peak * jax.device_count())
  return out


def read_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl file (a local path or a URL), in order; blank lines skipped."""
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def drop_records_after(path: str, step: int) -> None:
  """Removes metrics of steps after `step` (work lost since the checkpoint a run resumes from)."""
  if not paths.exists(path):
    return

  def kept(line: str) -> bool:
    try:
      return json.loads(line)['step'] <= step
    except (ValueError, KeyError):  # A line cut short by a kill.
      return False
  paths.write_text(path, ''.join(l for l in paths.read_text(path).splitlines(True) if kept(l)))


class RunWriter:
  """metrics.jsonl + TensorBoard events of one run; a no-op when not `enabled`."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
    self.enabled = enabled
    self.metrics_path = paths.join(workdir, METRICS)
    self._tb = None
    if not enabled:
      return
    drop_records_after(self.metrics_path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    logdir = paths.join(workdir, TENSORBOARD)
    if paths.is_url(logdir):
      paths.register_tensorboard_writer(logdir.split('://', 1)[0])
    self._tb = SummaryWriter(logdir=logdir, purge_step=resume_step + 1 if resume_step else None,
                             flush_secs=30)

  def scalars(self, step: int, record: dict) -> None:
    """One JSON line (with `step`) and one TensorBoard scalar per numeric entry."""
    if not self.enabled:
      return
    paths.append_text(self.metrics_path, json.dumps(dict(record, step=step)) + '\n')
    for name, value in record.items():
      if name not in ('step', 'nonfinite'):
        self._tb.add_scalar(_tag(name), float(value), step)
    self._tb.flush()

  def image(self, step: int, tag: str, grid: np.ndarray) -> None:
    """grid: uint8 (H, W, C) with C in {1, 3}."""
    if self.enabled:
      self._tb.add_image(tag, np.asarray(grid), step, dataformats='HWC')
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _tag(name: str) -> str:
  """TensorBoard tag: losses under loss/, rates under perf/, the rest under train/."""
  if name.startswith('loss'):
    return 'loss/' + ('total' if name == 'loss' else name[len('loss_'):])
  if name in ('steps_per_sec', 'images_per_sec', 'mfu_estimate'):
    return 'perf/' + name
  return 'train/' + name


def read_events(logdir: str) -> dict[str, list[tuple[int, object]]]:
  """{tag: [(step, value)]} of the event files in `logdir` (a local path or URL): floats for
  scalars, decoded uint8 (H, W, C) arrays for images. Checks each record's CRCs, as TensorBoard
  does; for tests and notebooks without TensorFlow."""
  import io as io_lib  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorboardX.crc32c import crc32c  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff

  out: dict[str, list[tuple[int, object]]] = {}
  for file in sorted(paths.as_path(logdir).glob('events.out.tfevents.*')):
    data, pos = file.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      (length_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
      record = data[pos + 12:pos + 12 + length]
      (record_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
      if masked(header) != length_crc or masked(record) != record_crc:
        raise ValueError(f'{file}: record at byte {pos} fails its CRC')
      pos += 16 + length
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('image'):
          item = np.asarray(Image.open(io_lib.BytesIO(value.image.encoded_image_string)))
        else:
          item = float(value.simple_value)
        out.setdefault(value.tag, []).append((event.step, item))
  return out
