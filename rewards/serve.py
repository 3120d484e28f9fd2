r"""Serve any reward (built-in kinds or plug-ins) over HTTP for `remote:WEIGHT:URL` terms (docs/rewards.md).

    python -m rewards.serve --reward.specs "pickscore:1.0" "plugin:1.0:my_rewards.py:Aesthetic" \
        --host 127.0.0.1 --port 8000

Binds 127.0.0.1 unless --host says otherwise. With the environment variable FDFO_REWARD_TOKEN set, every request
must carry `Authorization: Bearer <token>` (the token is never logged). Every request is bounded: a body larger
than --max-request-mb (or a Content-Length that is not a number) is refused before it is read, a connection silent
for --request-timeout seconds is closed, and at most --max-connections are open at once (one more gets 503). The wire
format is in rewards/remote.py: JSON with base64 8-bit pixels, no pickle.

HTTP: the standard library's `ThreadingHTTPServer` (one thread per connection); the reward runs in ONE worker
thread (`Batcher`), which scores the requests queued meanwhile together, so concurrent training processes share the
model and each gets exactly its own scores back; when such a batched call fails, each request is scored alone, so
only the one that fails gets the error.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import json
import math
import os
import queue
import socket
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from rewards.config import RewardConfig
from rewards.remote import TOKEN_ENV, check_token


@dataclass
class ServeConfig:
    reward: RewardConfig = field(default_factory=RewardConfig)
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 (this machine only) unless you mean to serve other hosts (then set a token)."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start)."""
    device: str | None = None
    """Torch device of the reward models; default cuda when available, else cpu."""
    max_request_mb: float = 64.0
    """Largest request body accepted, in MiB (a 512 px image is about 1 MiB as base64)."""
    max_batch_images: int = 64
    """At most this many queued images are scored in one call of the reward (which still runs in chunks of \
--reward.chunk-size)."""
    request_timeout: float = 60.0
    """Seconds a connection may stay silent (while its request line, headers or body are due, or while it idles
between requests) before the server closes it."""
    max_connections: int = 64
    """Connections open at once; one more is answered HTTP 503 (busy: the client retries) at once."""


MAX_TIMEOUT_S = 86400  # --request-timeout at most a day (a socket timeout must fit the C timeval)


class Batcher:
    """One worker thread that owns the reward: `score(prompts, pixels)` queues a request and waits for its scores;
    the worker takes every request queued meanwhile (up to `max_images` images), scores those of one image size
    together and hands each request its own rows."""

    def __init__(self, reward, device: torch.device, max_images: int):
        self.reward, self.device, self.max_images = reward, device, max_images
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="reward-batcher", daemon=True)
        self.thread.start()

    def score(self, prompts: list[str], pixels: torch.Tensor) -> dict[str, list]:
        done: Future = Future()
        self.queue.put((prompts, pixels, done))
        return done.result()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            batch, count = [item], item[1].shape[0]
            while count < self.max_images:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(more)
                count += more[1].shape[0]
            for size in {tuple(p.shape[2:]) for _, p, _ in batch}:
                self._run([b for b in batch if tuple(b[1].shape[2:]) == size])

    def _run(self, batch: list) -> None:
        """Score `batch` in one call; if that fails, each request alone, so that only a failing one gets its error."""
        try:
            prompts = [p for prompts, _, _ in batch for p in prompts]
            pixels = torch.cat([pixels for _, pixels, _ in batch]).to(self.device)
            with torch.no_grad():
                parts = self.reward.components(prompts, pixels.float() / 255)
            rows = {k: [x if math.isfinite(x) else None for x in v.double().cpu().tolist()] for k, v in parts.items()}
        except Exception as err:  # the server goes on
            if len(batch) > 1:
                for request in batch:
                    self._run([request])
            else:
                batch[0][2].set_exception(err)
            return
        start = 0
        for prompts, _, done in batch:
            done.set_result({k: v[start:start + len(prompts)] for k, v in rows.items()})
            start += len(prompts)


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_request(body: bytes) -> tuple[list[str], torch.Tensor]:
    """The `POST /score` JSON -> (prompts, uint8 pixels [B, 3, H, W]); BadRequest (400) naming what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"malformed JSON: {err}") from None
    if not isinstance(request, dict) or not {"prompts", "shape", "pixels"} <= set(request):
        raise BadRequest(400, 'expected a JSON object with "prompts", "shape" and "pixels"')
    prompts, shape, pixels = request["prompts"], request["shape"], request["pixels"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, '"prompts" must be a list of strings')
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) and s >= 1 for s in shape)
            or shape[1] != 3 or shape[0] != len(prompts)):
        raise BadRequest(400, f'"shape" must be [B, 3, H, W] with B = {len(prompts)} prompts; got {shape}')
    try:
        data = base64.b64decode(pixels, validate=True) if isinstance(pixels, str) else None
    except (binascii.Error, ValueError):
        data = None
    if data is None or len(data) != math.prod(shape):
        raise BadRequest(400, f'"pixels" must be base64 of {math.prod(shape)} uint8 values (shape {shape})')
    return prompts, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*shape)


class RewardHandler(BaseHTTPRequestHandler):
    """`GET /health` and `POST /score` for `self.service` (set by `attach` on a subclass per server)."""

    protocol_version = "HTTP/1.1"
    service: Service

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        if self._allowed():
            if self.path.rstrip("/") == "/health":
                self._send(200, self.service.health)
            else:
                self._error(404, f"no {self.path}; use GET /health or POST /score")

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        if self.path.rstrip("/") != "/score":
            return self._error(404, f"no {self.path}; use POST /score")
        try:
            body = self._body()
        except BadRequest as err:
            return self._error(err.status, str(err))
        except TimeoutError:  # a client that stopped sending holds no thread for longer than --request-timeout
            return self._error(408, f"the request body stopped arriving for --request-timeout "
                                    f"{self.service.cfg.request_timeout:g} s")
        try:
            scores = self.service.batcher.score(*decode_request(body))
        except BadRequest as err:
            return self._error(err.status, str(err))
        except Exception as err:
            return self._error(500, f"the reward failed: {type(err).__name__}: {err}")
        self._send(200, json.dumps({"scores": scores}).encode())

    def _body(self) -> bytes:
        """The request body, read only once its Content-Length is known to be a number within the limit."""
        length = body_length(self.headers.get_all("Content-Length") or [], self.service.cfg.max_request_mb)
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadRequest(400, f"the body ended after {len(body)} of its {length} bytes (Content-Length)")
        return body

    def _allowed(self) -> bool:
        given, token = self.headers.get("Authorization", ""), self.service.token
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            self._error(401, f"missing or wrong token (the server requires the one in {TOKEN_ENV})")
            return False
        return True

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True  # an unread (oversize) body must not be taken for the next request
        self._send(status, json.dumps({"error": message}).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # request line and status only: never the headers
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def body_length(values: list[str], max_mb: float) -> int:
    """The body size a request announces (its Content-Length headers), before any of the body is read: BadRequest
    411 without one, 400 unless it is one whole number >= 0, 413 above --max-request-mb."""
    if not values:
        raise BadRequest(411, "a Content-Length header is required")
    text = values[0].strip()
    if len(values) > 1 or not (text.isascii() and text.isdigit()):
        raise BadRequest(400, f"Content-Length {', '.join(values)!r} is not one whole number of bytes >= 0")
    length = int(text) if len(text) < 19 else math.inf  # (int() refuses strings of over 4300 digits)
    if length > int(max_mb * 2**20):
        raise BadRequest(413, f"request of {text} bytes is larger than the server's --max-request-mb {max_mb:g}; "
                              f"send fewer images per request (--reward.chunk-size)")
    return length


class BoundedServer(ThreadingHTTPServer):
    """The standard library's threading HTTP server with at most `max_connections` connections open at once: one
    more is answered 503 (the client's retry signal) at once, without a thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_connections: int):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, RewardHandler, bind_and_activate=False)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            refuse_busy(request, client_address, self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def refuse_busy(request: socket.socket, client_address, limit: int) -> None:
    """HTTP 503 on a connection over --max-connections, written by the accepting thread (bounded by a 1 s send
    timeout); what the client sent meanwhile is read first, so that closing does not reset the connection."""
    body = json.dumps({"error": f"busy: the server already holds --max-connections {limit} connections"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    try:
        request.settimeout(1.0)
        request.sendall(head + body)
        request.setblocking(False)
        while request.recv(65536):
            pass
    except OSError:
        pass
    sys.stderr.write(f"{client_address[0]} refused: HTTP 503 (--max-connections {limit})\n")


def open_server(cfg: ServeConfig) -> BoundedServer:
    """A server bound to --host / --port, not yet listening (connections are refused until `attach`); ValueError
    naming the flag when the address cannot be used."""
    server = None
    try:
        server = BoundedServer((cfg.host, cfg.port), cfg.max_connections)
        server.server_bind()
        return server
    except socket.gaierror as err:
        problem = f"--host {cfg.host!r} cannot be resolved ({err.strerror}); give a name or address of this machine"
    except OSError as err:
        problem = {
            errno.EADDRINUSE: f"--port {cfg.port}: the address {cfg.host}:{cfg.port} is already in use (another "
                              f"reward server?); stop that process, pick another --port, or --port 0 for any free one",
            errno.EADDRNOTAVAIL: f"--host {cfg.host!r} is not an address of this machine; give one of its own "
                                 f"addresses (127.0.0.1: this machine only; 0.0.0.0: all of them)",
            errno.EACCES: f"--port {cfg.port}: permission denied (ports below 1024 need privileges); pick a port "
                          f">= 1024, or --port 0 for any free one",
        }.get(err.errno, f"--host {cfg.host!r} --port {cfg.port}: cannot listen there: {err.strerror or err}")
    if server is not None:
        server.server_close()
    raise ValueError(problem)


@dataclass
class Service:
    """What every connection's handler reads: the config, the health answer, the token and the batcher."""

    cfg: ServeConfig
    health: bytes
    token: str
    batcher: Batcher


def attach(server: BoundedServer, cfg: ServeConfig, reward, device: torch.device) -> Batcher:
    """Serve `reward` on `server` (from `open_server`): start its batcher, give the handlers their service and
    start listening. Call `serve_forever()`, then `shutdown()`, `server_close()` and the batcher's `stop()`."""
    batcher = Batcher(reward, device, cfg.max_batch_images)
    health = json.dumps({"names": list(reward.names), "weights": [t.weight for t in reward.terms],
                         "max_request_bytes": int(cfg.max_request_mb * 2**20)}).encode()
    service = Service(cfg, health, os.environ.get(TOKEN_ENV, ""), batcher)
    server.RequestHandlerClass = type("Handler", (RewardHandler,), {"service": service,
                                                                    "timeout": cfg.request_timeout})
    server.server_activate()
    return batcher


def make_server(cfg: ServeConfig, reward, device: torch.device) -> tuple[BoundedServer, Batcher]:
    """A listening (not yet serving) HTTP server for `reward`; call `serve_forever()`, then `shutdown()`,
    `server_close()` and the batcher's `stop()`."""
    server = open_server(cfg)
    return server, attach(server, cfg, reward, device)


def check_serve_config(cfg: ServeConfig) -> None:
    """Every flag and the token, before the port is bound or a model loads (one line naming the flag)."""
    from fdfo.cli import check_device
    from rewards.build import parse_spec

    if not cfg.reward.specs:
        raise ValueError('--reward.specs is required: the terms to serve, e.g. "pickscore:1.0".')
    remote = [s for s in cfg.reward.specs if parse_spec(s).kind == "remote"]
    if remote:
        raise ValueError(f"--reward.specs {remote[0]!r}: a reward server serves local terms, not remote ones.")
    if not 0 <= cfg.port <= 65535:
        raise ValueError(f"--port {cfg.port} is invalid: it must be in 0..65535 (0: any free port).")
    if not (math.isfinite(cfg.max_request_mb) and cfg.max_request_mb > 0) or cfg.max_batch_images < 1:
        raise ValueError(f"--max-request-mb {cfg.max_request_mb} must be > 0 and --max-batch-images "
                         f"{cfg.max_batch_images} >= 1.")
    if not (math.isfinite(cfg.request_timeout) and 0 < cfg.request_timeout <= MAX_TIMEOUT_S):
        raise ValueError(f"--request-timeout {cfg.request_timeout} is invalid: it must be > 0 and at most "
                         f"{MAX_TIMEOUT_S} (seconds a connection may stay silent).")
    if cfg.max_connections < 1:
        raise ValueError(f"--max-connections {cfg.max_connections} is invalid: it must be >= 1.")
    check_device("--device", cfg.device)
    check_token()


def serve(cfg: ServeConfig) -> None:
    from rewards.build import build_from_specs, check_specs

    check_serve_config(cfg)
    check_specs(cfg.reward.specs)
    server = open_server(cfg)  # a port in use is one line before any model loads
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        reward = build_from_specs(cfg.reward.specs, cfg.reward, device)
        batcher = attach(server, cfg, reward, device)
        host, port = server.server_address[:2]
        token = "required (from FDFO_REWARD_TOKEN)" if os.environ.get(TOKEN_ENV) else "none"
        print(f"serving {reward} on http://{host}:{port} (token: {token})", flush=True)
        try:
            server.serve_forever()
        finally:
            batcher.stop()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    import tyro

    from fdfo.cli import guarded

    guarded(lambda: serve(tyro.cli(ServeConfig, args=argv, description=__doc__)))


if __name__ == "__main__":
    main()
