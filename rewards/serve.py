r"""Serve any reward (built-in kinds or plug-ins) over HTTP for `remote:WEIGHT:URL` terms (docs/rewards.md).

    python -m rewards.serve --reward.specs "pickscore:1.0" "plugin:1.0:my_rewards.py:Aesthetic" \
        --host 127.0.0.1 --port 8000

Binds 127.0.0.1 unless --host says otherwise. With the environment variable FDFO_REWARD_TOKEN set, every request
must carry `Authorization: Bearer <token>` (the token is never logged). Requests larger than --max-request-mb are
refused before they are read. The wire format is in rewards/remote.py: JSON with base64 8-bit pixels, no pickle.

HTTP: the standard library's `ThreadingHTTPServer` (one thread per connection); the reward runs in ONE worker
thread (`Batcher`), which scores the requests queued meanwhile together, so concurrent training processes share the
model and each gets exactly its own scores back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import os
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from rewards.config import RewardConfig
from rewards.remote import TOKEN_ENV


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
        try:
            prompts = [p for prompts, _, _ in batch for p in prompts]
            pixels = torch.cat([pixels for _, pixels, _ in batch]).to(self.device)
            with torch.no_grad():
                parts = self.reward.components(prompts, pixels.float() / 255)
            rows = {k: [x if math.isfinite(x) else None for x in v.double().cpu().tolist()] for k, v in parts.items()}
        except Exception as err:  # the requests of this batch get the error; the server goes on
            for _, _, done in batch:
                done.set_exception(err)
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


def make_server(cfg: ServeConfig, reward, device: torch.device) -> tuple[ThreadingHTTPServer, Batcher]:
    """A bound (not yet serving) HTTP server for `reward`; call `serve_forever()`, then `shutdown()`,
    `server_close()` and the batcher's `stop()`."""
    batcher = Batcher(reward, device, cfg.max_batch_images)
    names = [n for n in reward.names]
    health = json.dumps({"names": names, "weights": [t.weight for t in reward.terms]}).encode()
    limit = int(cfg.max_request_mb * 2**20)
    token = os.environ.get(TOKEN_ENV, "")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self._allowed():
                if self.path.rstrip("/") == "/health":
                    self._send(200, health)
                else:
                    self._error(404, f"no {self.path}; use GET /health or POST /score")

        def do_POST(self) -> None:  # noqa: N802
            if not self._allowed():
                return
            if self.path.rstrip("/") != "/score":
                return self._error(404, f"no {self.path}; use POST /score")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._error(411, "a Content-Length header is required")
            if length > limit:
                return self._error(413, f"request of {length} bytes is larger than the server's --max-request-mb "
                                        f"{cfg.max_request_mb:g}; send fewer images per request")
            try:
                prompts, pixels = decode_request(self.rfile.read(length))
                scores = batcher.score(prompts, pixels)
            except BadRequest as err:
                return self._error(err.status, str(err))
            except Exception as err:
                return self._error(500, f"the reward failed: {type(err).__name__}: {err}")
            self._send(200, json.dumps({"scores": scores}).encode())

        def _allowed(self) -> bool:
            given = self.headers.get("Authorization", "")
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

    server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    server.daemon_threads = True
    return server, batcher


def check_serve_config(cfg: ServeConfig) -> None:
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


def serve(cfg: ServeConfig) -> None:
    from rewards.build import build_from_specs, check_specs

    check_serve_config(cfg)
    check_specs(cfg.reward.specs)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reward = build_from_specs(cfg.reward.specs, cfg.reward, device)
    server, batcher = make_server(cfg, reward, device)
    host, port = server.server_address[:2]
    token = "required (from FDFO_REWARD_TOKEN)" if os.environ.get(TOKEN_ENV) else "none"
    print(f"serving {reward} on http://{host}:{port} (token: {token})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        batcher.stop()


def main(argv: list[str] | None = None) -> None:
    import tyro

    from fdfo.cli import guarded

    guarded(lambda: serve(tyro.cli(ServeConfig, args=argv, description=__doc__)))


if __name__ == "__main__":
    main()
