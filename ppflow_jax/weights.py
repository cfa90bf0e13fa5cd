"""Pretrained weights by name: the official download addresses, a cache, resumable downloads.

  python -m ppflow_jax.weights PPF-XL-2.pt            # prints the cached file's path

`resolve(spec)` turns what a user passes as `--ckpt` / `--config.train.init_from` into a local file:
- an existing path: itself;
- a released name (`PPF-XL-2.pt`, `PPF-XL-3.pt`, `SiT-XL-2-256x256.pt`, `DiT-XL-2-256x256.pt`, with
  or without `.pt`): downloaded once into the cache (`$PPFLOW_CACHE`, default
  `~/.cache/ppflow_jax`; local only, a URL is refused), resumed from a partial `.part` file with an HTTP Range request, with a
  progress bar, checked against the server's length and, where `REGISTRY` knows it, a size and
  SHA-256; the SHA-256 of every download is kept beside it (`<file>.sha256`) and re-checked on
  each later use of the cached copy;
- an `http(s)://` URL: the same, cached under its file name;
- `hf:<repo id>` (e.g. `hf:stabilityai/sd-vae-ft-mse`): a diffusers directory fetched with
  huggingface_hub (its own cache), `config.json` and safetensors weights only.

Addresses are those of the upstream `download.py` files: PPFlow's (the two PPF files, Dropbox
share links, asked for with `dl=1` so Dropbox sends the file rather than its preview page), SiT's
(`SiT-XL-2-256x256.pt`, Dropbox) and DiT's (`dl.fbaipublicfiles.com/DiT/models/<name>`). None of
them publishes a size or a hash, so the first download can only be checked against the length the
server announces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request

from ppflow_jax import errors
from ppflow_jax import paths

SHA_SUFFIX = '.sha256'
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Release:
  """One released weight file: where upstream serves it and which config samples it."""
  name: str                    # the file name upstream uses
  url: str
  config: str | None           # packaged config that matches its layout (None: init only)
  size: int | None = None      # bytes, when published
  sha256: str | None = None    # hex digest, when published
  note: str = ''


REGISTRY: dict[str, Release] = {r.name: r for r in (
    Release('PPF-XL-2.pt', 'https://www.dropbox.com/scl/fi/uh4o7kra6fnwlrd2lmry0/PPF-XL-2.pt'
            '?rlkey=k26p7aw7zwar1a8x0em74vhor&st=upovbj1j&dl=1', 'ppf_xl_2',
            note='official PPFlow, ImageNet 256, FID 1.99'),
    Release('PPF-XL-3.pt', 'https://www.dropbox.com/scl/fi/0tnt99s21532sxfg804vq/PPF-XL-3.pt'
            '?rlkey=gt7shf2i23jb40pxzv9t0nje3&st=hlbtmvhi&dl=1', 'ppf_xl_3',
            note='official PPFlow, ImageNet 256, FID 2.23'),
    Release('SiT-XL-2-256x256.pt', 'https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/'
            'SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=1', 'sit_xl_2',
            note='SiT-XL/2, ImageNet 256, 7M steps'),
    Release('DiT-XL-2-256x256.pt', 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt',
            None, note='DiT-XL/2 (epsilon-prediction DDPM): an initialisation for PPF/SiT only'),
)}


def cache_dir() -> str:
  """$PPFLOW_CACHE or ~/.cache/ppflow_jax: a local directory only, because torch.load and the
  converters read local files (a bucket mounted with gcsfuse is a local path and works)."""
  path = os.environ.get('PPFLOW_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ppflow_jax')
  if paths.is_url(path):
    raise errors.UserError(
        f'PPFLOW_CACHE={path!r} is a URL, but the weights cache must be a local directory '
        '(torch.load reads local files); set it to a local path or a gcsfuse mount of the bucket')
  return paths.check(path, 'PPFLOW_CACHE')


def require_local(path: str) -> None:
  """Raises UserFileError for a URL: weight files are read from local disk (torch.load)."""
  if paths.is_url(path):
    raise errors.UserFileError(
        f'{path!r}: weight files are read from local disk (torch.load); copy it first (gcloud '
        'storage cp) or mount the bucket, and pass the local path')


def release(name: str) -> Release | None:
  """The registry entry of `name` (`PPF-XL-2`, `PPF-XL-2.pt`, any case), or None."""
  key = name if name.endswith('.pt') else name + '.pt'
  return next((r for n, r in REGISTRY.items() if n.lower() == key.lower()), None)


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(_CHUNK), b''):
      h.update(block)
  return h.hexdigest()


class DownloadError(errors.UserError, OSError):
  """A download failed or its bytes do not match what was expected."""


def _open(url: str, start: int):
  request = urllib.request.Request(url, headers={'User-Agent': 'ppflow_jax'})
  if start:
    request.add_header('Range', f'bytes={start}-')
  return urllib.request.urlopen(request, timeout=60)  # pylint: disable=consider-using-with


def download(url: str, dest: str, *, size: int | None = None, sha256: str | None = None,
             progress: bool = True) -> str:
  """Downloads `url` to `dest` (resuming `dest.part`), checks it, returns `dest`."""
  if os.path.isfile(dest):
    return verify_cached(dest, size=size, sha256=sha256)
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + '.part'
  start = os.path.getsize(part) if os.path.exists(part) else 0
  try:
    response = _open(url, start)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # the partial file is already complete (or longer): restart
      os.remove(part)
      return download(url, dest, size=size, sha256=sha256, progress=progress)
    raise DownloadError(f'downloading {url}: HTTP {e.code} {e.reason}') from e
  except (urllib.error.URLError, OSError) as e:
    raise DownloadError(f'downloading {url}: {getattr(e, "reason", e)}; check the network '
                        f'(a partial download in {part} is resumed on the next try)') from e
  import tqdm  # pylint: disable=g-import-not-at-top
  with response:
    if start and response.status != 206:  # the server ignored the Range header: start over
      start = 0
    length = response.headers.get('Content-Length')
    total = start + int(length) if length is not None else None
    with open(part, 'ab' if start else 'wb') as f, tqdm.tqdm(
        total=total, initial=start, unit='B', unit_scale=True, unit_divisor=1024,
        desc=os.path.basename(dest), disable=not progress, file=sys.stderr) as bar:
      try:
        for block in iter(lambda: response.read(_CHUNK), b''):
          f.write(block)
          bar.update(len(block))
      except OSError as e:
        raise DownloadError(f'downloading {url} stopped after {f.tell()} bytes ({e}); run the '
                            f'same command again to resume from {part}') from e
  got = os.path.getsize(part)
  if total is not None and got != total:
    raise DownloadError(f'downloading {url} stopped after {got} of {total} bytes; run the same '
                        f'command again to resume from {part}')
  _check(part, url, size=size, sha256=sha256)
  os.replace(part, dest)
  with open(dest + SHA_SUFFIX, 'w') as f:
    f.write(sha256_of(dest) + '\n')
  return dest


def _check(path: str, what: str, *, size: int | None, sha256: str | None) -> None:
  got = os.path.getsize(path)
  if size is not None and got != size:
    os.remove(path)
    raise DownloadError(f'{what}: {got} bytes, expected {size}; the damaged file was removed, '
                        'run the same command again')
  if sha256 is not None and sha256_of(path) != sha256:
    os.remove(path)
    raise DownloadError(f'{what}: SHA-256 differs from the expected {sha256}; the damaged file '
                        'was removed, run the same command again')


def verify_cached(path: str, *, size: int | None = None, sha256: str | None = None) -> str:
  """A cached file checked against the expected size/hash and the hash kept at download time."""
  recorded = None
  if os.path.exists(path + SHA_SUFFIX):
    with open(path + SHA_SUFFIX) as f:
      recorded = f.read().strip() or None
  if size is not None and os.path.getsize(path) != size:
    raise DownloadError(f'cached {path} has {os.path.getsize(path)} bytes, expected {size}; '
                        'delete it and run again')
  expected = sha256 or recorded
  if expected is not None and sha256_of(path) != expected:
    raise DownloadError(f'cached {path} no longer matches its SHA-256 {expected} (changed or '
                        'damaged since it was downloaded); delete it and run again')
  return path


def resolve(spec: str, *, progress: bool = True) -> str:
  """A local file or directory for `spec` (see the module docstring); downloads if needed."""
  if spec.startswith('hf:'):
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    try:
      return snapshot_download(spec[3:], allow_patterns=['config.json', '*.safetensors'])
    except Exception as e:  # huggingface_hub raises many types; all mean "could not fetch it"
      raise DownloadError(f'{spec}: huggingface_hub could not fetch {spec[3:]!r} '
                          f'({type(e).__name__}: {e})') from e
  if os.path.exists(spec):
    return spec
  entry = release(spec)
  if entry is not None:
    return download(entry.url, os.path.join(cache_dir(), entry.name), size=entry.size,
                    sha256=entry.sha256, progress=progress)
  if re.match(r'^https?://', spec):
    name = os.path.basename(spec.split('?', 1)[0]) or 'download'
    return download(spec, os.path.join(cache_dir(), name), progress=progress)
  require_local(spec)
  raise errors.UserFileError(
      f'{spec!r} is neither a file nor a released weight name; give a path, an http(s) URL, '
      f'hf:<repo id>, or one of {", ".join(REGISTRY)}')


def main(argv: list[str]) -> None:
  names = argv[1:]
  if not names:
    raise errors.UserError('give one or more names to download: ' + ', '.join(REGISTRY))
  for name in names:
    print(resolve(name))


def console() -> None:
  from ppflow_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)


if __name__ == '__main__':
  console()
