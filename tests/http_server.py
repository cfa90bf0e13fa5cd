"""A local HTTP file server for download tests (127.0.0.1 only, no internet): serves a dict of
{path: bytes}, honours `Range: bytes=N-` with 206 replies, and can cut a reply short once."""

from __future__ import annotations

import contextlib
import http.server
import threading


class Files:
  """What the server serves, and how: `cut_after[path] = n` sends only n bytes once."""

  def __init__(self, files: dict[str, bytes]):
    self.files = dict(files)
    self.cut_after: dict[str, int] = {}
    self.requests: list[tuple[str, str | None]] = []


def _handler(files: Files):
  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.split('?', 1)[0]
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
