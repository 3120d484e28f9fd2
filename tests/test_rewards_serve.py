"""The reward server (rewards/serve.py) and its client (rewards/remote.py), on 127.0.0.1 only: the same scores as in
process, batching of concurrent requests, every refusal with its message, and a server that dies mid-run ending the
run cleanly so that a rerun resumes bit for bit. Every server thread / process is stopped by the test that made it."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch

from fdfo import train_loop
from fdfo.errors import RunError
from rewards import RewardConfig, build_from_specs
from rewards.remote import TOKEN_ENV, RewardServerDown, encode_request
from rewards.serve import Batcher, ServeConfig, make_server
from tests.test_train import _adapter, read_log, tiny_config
from tests.tiny_rewards import save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(specs, reward_cfg=None, port=0, **options):
    """A reward server in a thread of this process on 127.0.0.1 (port 0: any free one); yields its URL; always
    stopped."""
    cfg = ServeConfig(reward=dataclasses.replace(reward_cfg or RewardConfig(), specs=tuple(specs)), port=port,
                      **options)
    reward = build_from_specs(cfg.reward.specs, cfg.reward, "cpu")
    server, batcher = make_server(cfg, reward, torch.device("cpu"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        batcher.stop()
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(specs, port=0):
    """`python -m rewards.serve` as a user starts it; yields (process, URL); killed and reaped on every way out."""
    process = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward.specs", *specs, "--port", str(port),
                                "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (token: ...)", or "" if it died
        assert " on http://127.0.0.1:" in line, process.stderr.read()
        yield process, line.split(" on ")[1].split()[0]
    finally:
        process.kill()
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()


def eight_bit(batch, size=32, seed=0):
    pixels = torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 255


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=1)
    return RewardConfig(pickscore_model=str(folder), pickscore_processor=str(folder), chunk_size=3)


def test_served_scores_equal_the_in_process_reward(clip_cfg):
    specs = ("pickscore:1.0", "redness:0.5")
    local = build_from_specs(specs, clip_cfg, "cpu")
    prompts = ["a photo of a cat", 'a "red" car', "a boat", "", "a dog"]
    images = eight_bit(5)
    with serving(specs, clip_cfg) as url:
        remote = build_from_specs([f"remote:2:{url}"], clip_cfg, "cpu")
        assert remote.names == ("remote", "pickscore", "redness")
        got, want = remote.components(prompts, images), local.components(prompts, images)
    for name in ("pickscore", "redness"):
        assert torch.equal(got[name], want[name]), name  # 8-bit inputs: exactly the same numbers
    assert torch.equal(got["remote"], want["reward"]) and torch.equal(got["reward"], 2 * want["reward"])
    floats = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # sent as 8 bits, rounded half up
    with serving(["redness:1"]) as url:
        got = build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu").components(prompts, floats)
    rounded = torch.floor(floats.double() * 255 + 0.5).float() / 255
    assert torch.equal(got["redness"], build_from_specs(["redness:1"], RewardConfig(), "cpu")(prompts, rounded))


def test_the_server_batches_queued_requests_and_answers_each_its_own_rows():
    entered, release, seen = threading.Event(), threading.Event(), []

    class Recorder:
        names, terms = ("mean",), ()

        def components(self, prompts, images):
            entered.set()
            release.wait(timeout=60)
            seen.append(list(prompts))
            mean = images.mean(dim=(1, 2, 3))
            return {"mean": mean, "reward": 2 * mean}

    batcher = Batcher(Recorder(), torch.device("cpu"), max_images=64)
    requests_ = [([f"p{i}{j}" for j in range(i + 1)], (eight_bit(i + 1, seed=i) * 255).to(torch.uint8))
                 for i in range(4)]
    answers = [None] * 4

    def ask(i):
        answers[i] = batcher.score(*requests_[i])

    threads = [threading.Thread(target=ask, args=(0,), daemon=True)]
    threads[0].start()
    assert entered.wait(timeout=60)  # the worker is scoring request 0; the other three queue up meanwhile
    threads += [threading.Thread(target=ask, args=(i,), daemon=True) for i in (1, 2, 3)]
    for thread in threads[1:]:
        thread.start()
    for _ in range(6000):  # bounded: at most a minute
        if batcher.queue.qsize() == 3:
            break
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers)
    batcher.stop()
    assert seen[0] == requests_[0][0] and sorted(map(len, seen[1:])) == [9]  # 2 + 3 + 4 images in one call
    for (prompts, pixels), answer in zip(requests_, answers):
        mean = (pixels.float() / 255).mean(dim=(1, 2, 3)).double()
        assert answer["mean"] == pytest.approx(mean.tolist(), abs=1e-6) and len(answer["reward"]) == len(prompts)


def test_refusals_each_with_a_message(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    with serving(["redness:1"], max_request_mb=0.01) as url:
        body = encode_request(["a"], (eight_bit(1) * 255).to(torch.uint8))
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        with pytest.raises(RunError, match=f"{url} refused the health check: HTTP 401.*{TOKEN_ENV}"):
            build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
        assert reward.components(["a"], eight_bit(1))["redness"].shape == (1,)
        headers = {"Authorization": "Bearer s3cret"}
        answer = requests.post(f"{url}/score", data=b"{not json", headers=headers, timeout=30)
        assert answer.status_code == 400 and "malformed JSON" in answer.json()["error"]
        answer = requests.post(f"{url}/score", json={**body, "prompts": ["a", "b"]}, headers=headers, timeout=30)
        assert answer.status_code == 400 and "B = 2 prompts" in answer.json()["error"]
        answer = requests.post(f"{url}/score", json={**body, "pixels": body["pixels"][:-8]}, headers=headers,
                               timeout=30)
        assert answer.status_code == 400 and "base64 of 3072 uint8 values" in answer.json()["error"]
        with pytest.raises(RunError, match="HTTP 413: .*larger than the server's --max-request-mb 0.01"):
            reward.components(["a"] * 4, eight_bit(4))  # 4 images of 32 px: 16 kB of base64 > 10 kB


class _Liar(BaseHTTPRequestHandler):
    """A "server" answering the health check, then one score too few, or text that is not JSON."""

    def do_GET(self):  # noqa: N802
        self._send(json.dumps({"names": ["x"]}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        malformed = self.server.malformed
        short = json.dumps({"scores": {"x": [1.0], "reward": [1.0]}}).encode()
        self._send(b"<html>oops</html>" if malformed else short)

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Busy(_Liar):
    """Answers the first score request with 503, the next ones properly (one score per image)."""

    def do_POST(self):  # noqa: N802
        count = int(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["shape"][0])
        self.server.posts += 1
        if self.server.posts == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(json.dumps({"scores": {"x": [0.5] * count, "reward": [0.5] * count}}).encode())


@pytest.mark.parametrize("retries", [0, 1])
def test_a_busy_server_is_retried(retries):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    server.posts = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(remote_retries=retries), "cpu")
        if retries == 0:
            with pytest.raises(RewardServerDown, match=r"did not answer \(HTTP 503"):
                reward.components(["a", "b"], eight_bit(2))
        else:
            assert reward.components(["a", "b"], eight_bit(2))["x"].tolist() == [0.5, 0.5]
        assert server.posts == 1 + retries
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.mark.parametrize("malformed, message", [(False, "answered 1 x scores for 2 images"),
                                                (True, "answered a score request with malformed JSON")])
def test_a_wrong_answer_is_an_error_naming_the_server(malformed, message):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    server.malformed = malformed
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
        with pytest.raises(RunError, match=f"reward server {url} {message}"):
            reward.components(["a", "b"], eight_bit(2))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def test_an_unreachable_server_is_one_error_before_the_run_folder(tmp_path):
    with serving(["redness:1"]) as url:
        pass  # the port is free again: nothing listens there
    cfg = tiny_config(tmp_path / "run")
    cfg.reward = RewardConfig(specs=(f"remote:1:{url}",))
    with pytest.raises(ValueError, match=f"reward server {url} .* is unreachable"):
        train_loop.train(cfg)
    assert not (tmp_path / "run").exists()


class _Thread:
    """A server thread on a fixed port that the test can kill (shutdown) and start again."""

    def __init__(self, port=0):
        self.stack = contextlib.ExitStack()
        self.url = self.stack.enter_context(serving(["redness:1"], port=port))

    def kill(self):
        self.stack.close()


class _Process(_Thread):
    def __init__(self, port=0):
        self.stack = contextlib.ExitStack()
        self.process, self.url = self.stack.enter_context(server_process(["redness:1"], port=port))


@pytest.mark.parametrize("kind", [_Thread, pytest.param(_Process, marks=pytest.mark.slow)])
def test_a_server_that_dies_mid_run_stops_it_and_a_rerun_resumes_bit_for_bit(tmp_path, monkeypatch, kind,
                                                                              no_reward_curve):
    def config(name, url):
        cfg = tiny_config(tmp_path / name, num_epochs=2)
        cfg.reward = RewardConfig(specs=(f"remote:1:{url}",), remote_retries=1)
        return cfg

    server = kind()
    try:
        url = server.url
        train_loop.train(config("a", url))  # uninterrupted
        save = train_loop.save

        def save_then_kill(run):
            save(run)
            server.kill()  # after epoch 0's checkpoint: epoch 1 cannot be scored

        monkeypatch.setattr(train_loop, "save", save_then_kill)
        with pytest.raises(RewardServerDown, match=f"reward server {url} did not answer .*2 attempt.*start the server "
                                                   f"again and rerun the same command to resume from epoch 1"):
            train_loop.train(config("b", url))
        monkeypatch.setattr(train_loop, "save", save)
    finally:
        server.kill()
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir()) == ["epoch-0000001"]
    server = kind(port=int(url.rsplit(":", 1)[1]))  # back on the same address
    try:
        train_loop.train(config("b", url))
    finally:
        server.kill()
    a, b = _adapter(tmp_path / "a", 2), _adapter(tmp_path / "b", 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [r for r in read_log(tmp_path / "b") if "reward_mean" in r]
    assert [r["epoch"] for r in logged] == [0, 1] and all("redness_mean" in r and "remote_mean" in r for r in logged)


@pytest.mark.slow  # two torchrun workers and a server process: about a minute on two busy cores
def test_two_training_processes_share_one_server(tmp_path):
    with server_process(["redness:1"]) as (process, url):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "train.py"), "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--num-epochs", "2",
             "--save-freq", "1", "--total-pairs-per-epoch", "8", "--sample.num-solver-steps", "3",
             "--image-log-freq", "0",
             "--reward.specs", f"remote:1:{url}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        process.kill()
        process.wait(timeout=60)
        served = process.stderr.read()
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in read_log(tmp_path / "run") if "reward_mean" in r]
    assert [r["epoch"] for r in logged] == [0, 1]
    assert all(r["remote_mean"] == pytest.approx(r["redness_mean"]) and r["invalid_pairs"] == 0 for r in logged)
    assert served.count('"POST /score HTTP/1.1" 200') == 2 * 2  # each rank's sampling batch, each epoch
