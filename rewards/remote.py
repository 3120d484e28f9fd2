"""The client of a reward server (rewards/serve.py): `remote:WEIGHT:URL`, one more scorer (docs/rewards.md).

Wire format (JSON over HTTP, no pickle): `POST URL/score` with `{"prompts": [...], "shape": [B, 3, H, W], "pixels":
base64 of the uint8 pixels in that C order}` (the 8-bit images metrics see, `fdfo.images.to_uint8`); the answer is
`{"scores": {name: [B numbers or null], ..., "reward": [...]}}`, null for a NaN score. `GET URL/health` answers
`{"names": [...], "weights": [...]}`. With the environment variable `FDFO_REWARD_TOKEN` set, every request carries
`Authorization: Bearer <token>`; the token is read from the environment only, never logged or written anywhere.

A connection error, a timeout or an HTTP 503 is retried `--reward.remote-retries` times with backoff (1, 2, 4, ...
s, at most 30 s each); a server that stays down raises `RewardServerDown`, which the training loop reports like a
pre-emption (the last checkpoint is intact; rerunning resumes). Any other bad answer raises `RunError` naming the
server.
"""

from __future__ import annotations

import base64
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


def auth_headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV, "")
    return {"Authorization": f"Bearer {token}"} if token else {}


class RemoteScorer:
    """`(prompts, images) -> {component: [B], ..., "reward": [B]}` scored by the server at `url`, in requests of at
    most `chunk_size` images; `component_names` are the served terms (weighted.py logs each under its name)."""

    name = "remote"

    def __init__(self, url: str, spec: str, timeout: float, retries: int, chunk_size: int):
        self.url, self.spec, self.timeout, self.retries, self.chunk_size = url.rstrip("/"), spec, timeout, retries, \
            chunk_size
        self.component_names: tuple[str, ...] = ()

    def connect(self) -> RemoteScorer:
        """The health check: the server must answer now (no retries) with the names it serves; ValueError naming the
        URL otherwise, so that a wrong address is one `error:` line before any run folder exists."""
        import requests

        try:
            answer = requests.get(f"{self.url}/health", headers=auth_headers(), timeout=min(self.timeout, 30.0))
        except requests.RequestException as err:
            raise ValueError(f"reward server {self.url} (spec {self.spec!r}) is unreachable: {type(err).__name__}. "
                             f"Start it with `python -m rewards.serve --reward.specs ...` or fix the URL.") from None
        body = self._json(answer, "the health check")
        names = body.get("names") if isinstance(body, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n != "reward" for n in names):
            raise ValueError(f"reward server {self.url} answered the health check without a list of reward names: "
                             f"is it a reward server (python -m rewards.serve)?")
        self.component_names = tuple(names)
        return self

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
        """POST /score with bounded retries on connection errors, timeouts and 503; the parsed JSON answer."""
        import requests

        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(MAX_BACKOFF_S, 2.0 ** (attempt - 1)))
            try:
                answer = requests.post(f"{self.url}/score", json=payload, headers=auth_headers(), timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as err:
                error = f"{type(err).__name__}"
                continue
            if answer.status_code == 503:
                error = "HTTP 503 (busy or shutting down)"
                continue
            return self._json(answer, "a score request")
        raise RewardServerDown(f"reward server {self.url} did not answer ({error}, {self.retries + 1} attempt(s); "
                               f"--reward.remote-retries {self.retries}, --reward.remote-timeout {self.timeout:g} s); "
                               f"the run stopped before saving this epoch")

    def _json(self, answer, what: str) -> object:
        if answer.status_code != 200:
            detail = answer.text.strip()[:300]
            hint = f" (set {TOKEN_ENV} to the server's token)" if answer.status_code == 401 else ""
            raise RunError(f"reward server {self.url} refused {what}: HTTP {answer.status_code}: {detail}{hint}")
        try:
            return answer.json()
        except ValueError:
            raise RunError(f"reward server {self.url} answered {what} with malformed JSON: "
                           f"{answer.text.strip()[:100]!r}") from None

    def __repr__(self) -> str:
        return f"RemoteScorer({self.url}: {', '.join(self.component_names)})"
