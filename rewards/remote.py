"""The client of a reward server (rewards/serve.py): `remote:WEIGHT:URL`, one more scorer (docs/rewards.md).

Wire format (JSON over HTTP, no pickle): `POST URL/score` with `{"prompts": [...], "shape": [B, 3, H, W], "pixels":
base64 of the uint8 pixels in that C order}` (the 8-bit images metrics see, `fdfo.images.to_uint8`); the answer is
`{"scores": {name: [B numbers or null], ..., "reward": [...]}}`, null for a NaN score. `GET URL/health` answers
`{"names": [...], "weights": [...]}`. With the environment variable `FDFO_REWARD_TOKEN` set, every request carries
`Authorization: Bearer <token>`; the token is read from the environment only, never logged or written anywhere.

Every request has a deadline of `--reward.remote-timeout` seconds for its whole answer, and redirects are never
followed (the token goes to the given URL only). A transport error (refused or reset connection, an answer cut short
or past its deadline) or an HTTP 503 is retried `--reward.remote-retries` times with backoff (1, 2, 4, ... s, at most
30 s each); a server that stays down raises `RewardServerDown`, which the training loop reports like a pre-emption
(the last checkpoint is intact; rerunning resumes). Any other bad answer raises `RunError` naming the server, in one
line.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from typing import Sequence

import torch

from fdfo.errors import RunError
from fdfo.images import to_uint8
from rewards.common import check_batch, chunk_slices

TOKEN_ENV = "FDFO_REWARD_TOKEN"
MAX_BACKOFF_S = 30.0


class RewardServerDown(RunError):
    """The reward server stayed unreachable through every retry; nothing of the current epoch was saved."""


def encode_request(prompts: Sequence[str], pixels: torch.Tensor) -> dict:
    """The JSON body of `POST /score` for uint8 `pixels [B, 3, H, W]`."""
    data = pixels.detach().cpu().contiguous().numpy().tobytes()
    return {"prompts": list(prompts), "shape": list(pixels.shape), "pixels": base64.b64encode(data).decode("ascii")}


def check_token() -> str:
    """The token of FDFO_REWARD_TOKEN ("" when unset); ValueError if an HTTP header cannot carry it as it is."""
    token = os.environ.get(TOKEN_ENV, "")
    if "\n" in token or "\r" in token:
        raise ValueError(f"{TOKEN_ENV} has a line break in it, which an HTTP header cannot carry: set it without one "
                         f"(e.g. export {TOKEN_ENV}=\"$(tr -d '\\r\\n' < token.txt)\").")
    if token != token.strip() or not all(" " <= c <= "~" for c in token):
        raise ValueError(f"{TOKEN_ENV} must be printable ASCII without leading or trailing spaces (an HTTP header "
                         f"carries it); set it without control characters, spaces at its ends or non-ASCII letters.")
    return token


def auth_headers() -> dict[str, str]:
    token = check_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def request_bytes(images: int, resolution: int) -> int:
    """About how large a `POST /score` body of `images` square 8-bit images is: 4 base64 characters per pixel (3
    bytes), 1 KiB per prompt, 256 bytes of JSON around them."""
    return images * (4 * resolution**2 + 1024) + 256


class RemoteScorer:
    """`(prompts, images) -> {component: [B], ..., "reward": [B]}` scored by the server at `url`, in requests of at
    most `chunk_size` images; `component_names` are the served terms (weighted.py logs each under its name)."""

    name = "remote"

    def __init__(self, url: str, spec: str, timeout: float, retries: int, chunk_size: int):
        self.url, self.spec, self.timeout, self.retries, self.chunk_size = url.rstrip("/"), spec, timeout, retries, \
            chunk_size
        self.component_names: tuple[str, ...] = ()
        self.max_request_bytes: int | None = None  # the server's --max-request-mb, if its health check says it

    def connect(self) -> RemoteScorer:
        """The health check: the server must answer now (no retries) with the names it serves; ValueError naming the
        URL otherwise, so that a wrong address is one `error:` line before any run folder exists."""
        try:
            answer = self._exchange("GET", "/health", None, min(self.timeout, 30.0))
        except transport_errors() as err:
            raise ValueError(f"reward server {self.url} (spec {self.spec!r}) is unreachable: {type(err).__name__}. "
                             f"Start it with `python -m rewards.serve --reward.specs ...` or fix the URL.") from None
        body = self._json(*answer, "the health check")
        names = body.get("names") if isinstance(body, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n != "reward" for n in names):
            raise ValueError(f"reward server {self.url} answered the health check without a list of reward names: "
                             f"is it a reward server (python -m rewards.serve)?")
        self.component_names = tuple(names)
        limit = body.get("max_request_bytes")
        self.max_request_bytes = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        return self

    def check_request_size(self, resolution: int) -> None:
        """ValueError, before anything loads, if requests of --reward.chunk-size images of `resolution` px exceed
        the server's size limit (servers that do not report one are not checked)."""
        limit, need = self.max_request_bytes, request_bytes(self.chunk_size, resolution)
        if limit is None or need <= limit:
            return
        fits = (limit - request_bytes(0, resolution)) // (request_bytes(1, resolution) - request_bytes(0, resolution))
        raise ValueError(f"--reward.chunk-size {self.chunk_size}: requests of {self.chunk_size} images of "
                         f"{resolution} px are about {need / 2**20:.2f} MiB, more than the {limit / 2**20:.2f} MiB "
                         f"that reward server {self.url} accepts (its --max-request-mb); "
                         f"{f'lower --reward.chunk-size to {fits} or ' if fits > 0 else ''}raise the server's "
                         f"--max-request-mb.")

    def to(self, device: torch.device | str) -> RemoteScorer:
        return self  # the model lives in the server's process

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_batch(prompts, images)
        pixels = to_uint8(images)
        parts = [self._score(list(prompts[s]), pixels[s]) for s in chunk_slices(images.shape[0], self.chunk_size)]
        keys = (*self.component_names, "reward")
        if not parts:
            return {k: torch.zeros(0, device=images.device) for k in keys}
        return {k: torch.cat([p[k] for p in parts]).to(images.device) for k in keys}

    def _score(self, prompts: list[str], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        body = self._post(encode_request(prompts, pixels))
        scores = body.get("scores") if isinstance(body, dict) else None
        keys = (*self.component_names, "reward")
        if not isinstance(scores, dict) or set(scores) != set(keys):
            got = sorted(scores) if isinstance(scores, dict) else type(scores).__name__
            raise RunError(f"reward server {self.url} answered without the scores {list(keys)} (got {got}); "
                           f"was it restarted with other --reward.specs?")
        out = {}
        for key in keys:
            values = scores[key]
            if not isinstance(values, list) or len(values) != len(prompts):
                count = len(values) if isinstance(values, list) else type(values).__name__
                raise RunError(f"reward server {self.url} answered {count} {key} scores for {len(prompts)} images.")
            if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                raise RunError(f"reward server {self.url} answered {key} scores that are not numbers.")
            out[key] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
        return out

    def _post(self, payload: dict) -> object:
        """POST /score with bounded retries on transport errors and 503; the parsed JSON answer."""
        data = json.dumps(payload).encode()
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(MAX_BACKOFF_S, 2.0 ** (attempt - 1)))
            try:
                answer = self._exchange("POST", "/score", data, self.timeout)
            except transport_errors() as err:
                error = f"{type(err).__name__}"
                continue
            if answer[0] == 503:
                error = "HTTP 503 (busy or shutting down)"
                continue
            return self._json(*answer, "a score request")
        raise RewardServerDown(f"reward server {self.url} did not answer ({error}, {self.retries + 1} attempt(s); "
                               f"--reward.remote-retries {self.retries}, --reward.remote-timeout {self.timeout:g} s); "
                               f"the run stopped before saving this epoch")

    def _exchange(self, method: str, path: str, data: bytes | None, deadline_s: float) -> tuple[int, dict, bytes]:
        """(status, headers (case-insensitive), body) of one request whose whole answer must arrive within
        `deadline_s` seconds; no redirect is followed."""
        import requests

        start = time.monotonic()
        headers = auth_headers() | ({"Content-Type": "application/json"} if data is not None else {})
        with requests.request(method, f"{self.url}{path}", data=data, headers=headers, timeout=deadline_s,
                              allow_redirects=False, stream=True) as answer:
            return answer.status_code, answer.headers, read_within(answer, start + deadline_s)

    def _json(self, status: int, headers: dict, body: bytes, what: str) -> object:
        if 300 <= status < 400:
            raise RunError(f"reward server {self.url} answered {what} with HTTP {status} (redirect to "
                           f"{headers.get('Location', 'no Location')}); redirects are not followed (the token goes "
                           f"to the given URL only): give the address it redirects to.")
        if status != 200:
            detail, ours = error_text(body)
            hint = f" (set {TOKEN_ENV} to the server's token)" if status == 401 else "" if ours else \
                " (not a reward server's answer: is it a reward server, python -m rewards.serve?)"
            raise RunError(f"reward server {self.url} refused {what}: HTTP {status}: {detail}{hint}")
        try:
            return json.loads(body)
        except ValueError:
            raise RunError(f"reward server {self.url} answered {what} with malformed JSON: "
                           f"{one_line(body, 100)!r}") from None

    def __repr__(self) -> str:
        return f"RemoteScorer({self.url}: {', '.join(self.component_names)})"


def transport_errors() -> tuple[type[BaseException], ...]:
    """What a request can raise when the connection or the transfer fails: retried, then `RewardServerDown`."""
    import requests

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError)


def read_within(answer, deadline: float) -> bytes:
    """The body of a streamed `requests` answer, read as it arrives with the socket's timeout set to the time left
    before `deadline` (time.monotonic()); requests.Timeout past it, ChunkedEncodingError if the answer is cut."""
    import requests
    import urllib3

    parts = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise requests.Timeout("the answer did not arrive completely before --reward.remote-timeout")
        sock = getattr(getattr(answer.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(left)
        try:
            part = answer.raw.read1(65536, decode_content=True) if hasattr(answer.raw, "read1") else \
                answer.raw.read(1, decode_content=True)  # urllib3 < 2: no read1
        except urllib3.exceptions.ReadTimeoutError as err:
            raise requests.Timeout(str(err)) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise requests.exceptions.ChunkedEncodingError(f"the answer was cut short: {err}") from err
        if not part:
            return b"".join(parts)
        parts.append(part)


def error_text(body: bytes) -> tuple[str, bool]:
    """(one line saying what an error answer says, whether it is a reward server's `{"error": ...}`)."""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    return (one_line(message.encode(), 300), True) if isinstance(message, str) else (one_line(body, 100), False)


def one_line(body: bytes, limit: int) -> str:
    return " ".join(body.decode("utf-8", errors="replace").split())[:limit]
