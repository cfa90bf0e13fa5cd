"""A local HTTP file server for download tests (127.0.0.1 only, no internet): serves a dict of
{path: bytes}, honours `Range: bytes=N-` with 206 replies, and can cut a reply short once. It also
answers the few Hugging Face Hub routes `snapshot_download` uses (repo info, file tree, resolve),
for repositories in `Files.hub`, so `HF_ENDPOINT=<base URL>` points huggingface_hub at it."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading

HUB_COMMIT = 'c' * 40


class Files:
  """What the server serves, and how: `cut_after[path] = n` sends only n bytes once."""

  def __init__(self, files: dict[str, bytes], hub: dict[str, dict[str, bytes]] | None = None):
    self.files = dict(files)
    self.hub = dict(hub or {})  # repo id -> {file name: bytes}
    self.cut_after: dict[str, int] = {}
    self.requests: list[tuple[str, str | None]] = []


def _handler(files: Files):
  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
      pass

    def _send(self, body: bytes, headers: dict[str, str]):
      self.send_response(200)
      for k, v in headers.items():
        self.send_header(k, v)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      if self.command == 'GET':
        self.wfile.write(body)

    def _hub(self, path: str) -> bool:
      """Hub routes: /api/models/REPO/revision/main, /api/models/REPO/tree/C, /REPO/resolve/C/F."""
      for repo, repo_files in files.hub.items():
        if path == f'/api/models/{repo}/revision/main':
          info = {'id': repo, 'sha': HUB_COMMIT,
                  'siblings': [{'rfilename': f} for f in repo_files]}
          self._send(json.dumps(info).encode(), {'Content-Type': 'application/json'})
          return True
        if path.startswith(f'/api/models/{repo}/tree/'):
          tree = [{'type': 'file', 'path': f, 'size': len(d), 'oid': hashlib.sha1(d).hexdigest()}
                  for f, d in repo_files.items()]
          self._send(json.dumps(tree).encode(), {'Content-Type': 'application/json'})
          return True
        for name, data in repo_files.items():
          if path in (f'/{repo}/resolve/{HUB_COMMIT}/{name}', f'/{repo}/resolve/main/{name}'):
            self._send(data, {'X-Repo-Commit': HUB_COMMIT,
                              'ETag': f'"{hashlib.sha256(data).hexdigest()}"'})
            return True
      return False

    def do_HEAD(self):  # pylint: disable=invalid-name
      if not self._hub(self.path.split('?', 1)[0]):
        self.send_error(404)

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.split('?', 1)[0]
      if self._hub(path):
        return
      files.requests.append((path, self.headers.get('Range')))
      if path not in files.files:
        self.send_error(404)
        return
      data, start = files.files[path], 0
      rng = self.headers.get('Range')
      if rng:
        start = int(rng.split('=')[1].split('-')[0])
        if start >= len(data):
          self.send_error(416)
          return
        self.send_response(206)
        self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
      else:
        self.send_response(200)
      body = data[start:]
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      cut = files.cut_after.pop(path, None)
      self.wfile.write(body if cut is None else body[:cut])
      if cut is not None:
        self.close_connection = True
  return Handler


@contextlib.contextmanager
def serve(files: Files):
  """Yields the base URL (http://127.0.0.1:PORT) of a server for `files`."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _handler(files))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()
