"""The HTTP side of the teacher server: the standard library's ThreadingHTTPServer.

Routes: GET /v1/models, GET /health, POST /v1/completions (distill.serve.protocol). Each
connection has its own thread; the engine's lock serialises the device work. `max_requests`
> 0 makes the server stop by itself after that many completions (bounded runs in tests, and
how the tests simulate a teacher that dies mid-run).
"""
from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from distill.serve import protocol
from distill.serve.engine import Engine


class TeacherServer(ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, engine: Engine, *, host: str = '127.0.0.1', port: int = 0,
               served_name: str, root: str = '', max_logprobs: int = 20, max_requests: int = 0,
               quiet: bool = True):
    self.engine, self.served_name, self.root = engine, served_name, root
    vocab = engine.model_config.vocab_size
    self.max_logprobs = vocab if max_logprobs == -1 else min(max_logprobs, vocab)
    self.max_requests, self.quiet = max_requests, quiet
    self.completions_served = 0
    self.stopped = False
    self._count_lock = threading.Lock()
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'http://{host}:{port}'

  def count_completion(self) -> None:
    """Counts a finished completion; past max_requests the server shuts itself down."""
    with self._count_lock:
      self.completions_served += 1
      done = self.max_requests and self.completions_served >= self.max_requests
    if done:
      self.stop()

  def stop(self) -> None:
    """Stops answering at once, as a killed server would: kept-alive connections are dropped
    (their handler threads outlive serve_forever) and the port is closed."""
    self.stopped = True

    def close():   # shutdown() waits for serve_forever, which may run in this very thread
      self.shutdown()
      self.server_close()
    threading.Thread(target=close, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'   # keep-alive: a client reuses its connection
  server: TeacherServer

  def log_message(self, format, *args):   # noqa: A002 (the base class's name)
    if not self.server.quiet:
      super().log_message(format, *args)

  def _send(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _dropped(self) -> bool:
    """True (and the connection closed unanswered) once the server has stopped."""
    self.close_connection = self.close_connection or self.server.stopped
    return self.server.stopped

  def do_GET(self):   # noqa: N802 (http.server's naming)
    server = self.server
    if self._dropped():
      return
    if self.path == '/v1/models':
      self._send(200, protocol.model_list(server.engine, served_name=server.served_name,
                                          root=server.root, max_logprobs=server.max_logprobs))
    elif self.path == '/health':
      self._send(200, {})
    else:
      self._send(404, protocol.RequestError(f'no route {self.path}', code=404,
                                            kind='NotFoundError').body())

  def do_POST(self):   # noqa: N802
    server = self.server
    if self._dropped():
      return
    if self.path != '/v1/completions':
      self._send(404, protocol.RequestError(f'no route {self.path}', code=404,
                                            kind='NotFoundError').body())
      return
    try:
      length = int(self.headers.get('Content-Length', 0))
      try:
        body = json.loads(self.rfile.read(length) or b'null')
      except json.JSONDecodeError as e:
        raise protocol.RequestError(f'the request body is not JSON: {e}') from None
      request = protocol.parse_completion(body, server.engine, served_name=server.served_name,
                                          max_logprobs=server.max_logprobs)
      response = protocol.complete(request, server.engine, served_name=server.served_name)
    except protocol.RequestError as e:
      self._send(e.code, e.body())
      return
    except Exception as e:   # a bug must reach the client as a 500, not a dropped connection
      self._send(HTTPStatus.INTERNAL_SERVER_ERROR, protocol.RequestError(
          f'{type(e).__name__}: {e}', code=500, kind='InternalServerError').body())
      raise
    self._send(200, response)
    server.count_completion()
    self._dropped()
