"""The reward server bounds every request and isolates each client (issue 31, cases 1-4): a real `python -m
rewards.serve` process started and stopped by its PID, spoken to over 127.0.0.1 with a raw socket client (every socket
with a timeout, every loop with a bounded count), and one in-process server whose batching the test can observe."""

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rewards import RewardConfig, build_from_specs
from rewards.remote import TOKEN_ENV, encode_request
from rewards.serve import ServeConfig, main, make_server

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30  # every socket read gives up after this long: a server that never answers fails the test, not hangs it


@contextlib.contextmanager
def server_pid(log: Path, *flags: str):
    """`python -m rewards.serve --reward.specs redness:1 FLAGS` on a free port; yields (pid, port); killed by its PID
    and reaped on every way out. Its request log goes to `log`."""
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward.specs", "redness:1", "--port", "0",
                                    "--device", "cpu", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                   text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (token: ...)", or "" if it died
        assert " on http://127.0.0.1:" in line, log.read_text()
        yield process.pid, int(line.split(" on http://127.0.0.1:")[1].split()[0])
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()


def score_body(images: int = 1, size: int = 8, prompt: str = "a red car") -> bytes:
    pixels = torch.arange(images * 3 * size * size).remainder(256).to(torch.uint8).view(images, 3, size, size)
    return json.dumps(encode_request([prompt] * images, pixels)).encode()


def request(length: str | None, extra: str = "") -> bytes:
    head = "POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra
    return (head + (f"Content-Length: {length}\r\n" if length is not None else "") + "\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int | None, bytes]:
    """(status, body) of one HTTP answer, read until its Content-Length is complete or the server closes; (None, b"")
    for a connection closed without an answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return (None, b"") if not data else (int(data.split()[1]), b"")
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(head.split()[1]), body


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def exchange(port: int, data: bytes, half_close: bool = False) -> tuple[int | None, bytes]:
    """Send `data` (then half-close) and read the answer. The server may answer and close before it has read all of
    `data` (a refusal before the body): the send or the half-close then fails, and the answer is still there."""
    with connect(port) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        return read_answer(sock)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A server with a 10 KiB request limit that closes connections silent for 1 s."""
    log = tmp_path_factory.mktemp("quick") / "server.log"
    with server_pid(log, "--max-request-mb", "0.01", "--request-timeout", "1") as (pid, port):
        yield pid, port, log


def test_a_length_that_is_not_a_number_is_refused_before_anything_is_read(quick):
    pid, port, _ = quick
    body = score_body(images=40)  # 40 images of 8 px: 15 kB of base64 > the 10 KiB limit
    assert len(body) > 0.01 * 2**20
    status, answer = exchange(port, request("-1") + body, half_close=True)  # read(-1) would read all of it
    assert status == 400 and "Content-Length '-1' is not one whole number" in json.loads(answer)["error"]
    for length, code in (("abc", 400), ("+5", 400), ("1e3", 400), (None, 411), ("99999999999999999999999", 413)):
        status, answer = exchange(port, request(length) + b"{}", half_close=True)
        assert status == code and json.loads(answer)["error"], (length, status, answer)
    status, _ = exchange(port, request("2", "Content-Length: 2\r\n") + b"{}")  # two lengths: refused, not guessed
    assert status == 400
    status, answer = exchange(port, request(str(len(score_body()))) + score_body())  # a proper one is scored
    assert status == 200 and len(json.loads(answer)["scores"]["redness"]) == 1


def test_a_silent_connection_is_closed_after_the_request_timeout(quick):
    pid, port, log = quick
    with connect(port) as half_headers, connect(port) as half_body, connect(port) as idle:
        half_headers.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        half_body.sendall(request("5000") + b"0123456789")  # 10 of 5,000 announced bytes
        assert read_answer(half_headers) == (None, b"")  # closed (no answer to half a request) within WAIT_S
        status, answer = read_answer(half_body)
        assert status == 408 and "--request-timeout 1 s" in json.loads(answer)["error"]
        assert read_answer(idle) == (None, b"")
    for _ in range(100):  # bounded: each of the three threads ends once its connection is closed
        if threads_of(pid) <= 2 + 1:  # the main thread, the batcher, at most one handler still closing
            break
        time.sleep(0.1)
    assert threads_of(pid) <= 3, log.read_text()


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_one_connection_over_max_connections_gets_503_at_once(tmp_path):
    with server_pid(tmp_path / "server.log", "--max-connections", "2") as (pid, port):
        first, second = connect(port), connect(port)
        try:
            first.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # both accepted and held open (keep-alive)
            second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(first)[0] == 200 and read_answer(second)[0] == 200
            status, answer = exchange(port, request(str(len(score_body()))) + score_body())
            assert status == 503 and "--max-connections 2" in json.loads(answer)["error"]
        finally:
            first.close()
        for _ in range(100):  # bounded: the closed connection's slot comes back
            status, _ = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
        second.close()
        assert "refused: HTTP 503 (--max-connections 2)" in (tmp_path / "server.log").read_text()


POISON = """
import os, time, torch

FOLDER = os.path.dirname(__file__)

def poisoned(prompts, images):
    '''Raises for a prompt with "poison"; holds a prompt "hold" until the file "release" exists (at most 60 s).'''
    with open(os.path.join(FOLDER, "calls.txt"), "a") as f:
        f.write("|".join(prompts) + "\\n")
    if "hold" in prompts:
        open(os.path.join(FOLDER, "entered"), "w").close()
        for _ in range(600):
            if os.path.exists(os.path.join(FOLDER, "release")):
                break
            time.sleep(0.1)
    if any("poison" in p for p in prompts):
        raise ValueError("this prompt is poison")
    return images.mean(dim=(1, 2, 3))
"""


def test_one_failing_request_of_a_batch_fails_alone(tmp_path):
    (tmp_path / "poison.py").write_text(POISON)
    cfg = ServeConfig(reward=RewardConfig(specs=(f"plugin:1:{tmp_path / 'poison.py'}:poisoned",)), port=0)
    reward = build_from_specs(cfg.reward.specs, cfg.reward, "cpu")
    (tmp_path / "calls.txt").unlink()  # the probe's call
    server, batcher = make_server(cfg, reward, torch.device("cpu"))
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    port, answers = server.server_address[1], {}

    def ask(prompt):
        body = score_body(prompt=prompt)
        answers[prompt] = exchange(port, request(str(len(body))) + body)

    clients = [threading.Thread(target=ask, args=(p,), daemon=True) for p in ("hold", "poison", "innocent")]
    try:
        clients[0].start()
        for _ in range(600):  # bounded: the worker is inside the "hold" call
            if (tmp_path / "entered").exists():
                break
            time.sleep(0.1)
        clients[1].start()
        clients[2].start()
        for _ in range(600):  # bounded: both other requests are queued behind it, to be scored in one call
            if batcher.queue.qsize() == 2:
                break
            time.sleep(0.01)
        assert batcher.queue.qsize() == 2
        (tmp_path / "release").touch()
        for client in clients:
            client.join(timeout=WAIT_S)
    finally:
        (tmp_path / "release").touch()
        server.shutdown()
        server.server_close()
        batcher.stop()
        serving.join(timeout=WAIT_S)
    calls = (tmp_path / "calls.txt").read_text().split()
    assert sorted(calls[1].split("|")) == ["innocent", "poison"]  # the two were batched; that call failed
    assert answers["hold"][0] == 200 and answers["innocent"][0] == 200
    mean = torch.arange(3 * 64).remainder(256).float().div(255).mean().item()
    assert json.loads(answers["innocent"][1])["scores"]["poisoned"] == pytest.approx([mean], abs=1e-6)
    status, body = answers["poison"]
    assert status == 500 and "this prompt is poison" in json.loads(body)["error"]


def run_main(argv, capsys, monkeypatch) -> str:
    """rewards.serve.main(argv) -> its one error line; the server must not start (serve_forever raises)."""

    def started(self, *args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(socketserver.BaseServer, "serve_forever", started)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    return line


def test_a_port_in_use_a_bad_host_and_a_missing_device_are_one_line_each(capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = run_main(["--reward.specs", "redness:1", "--port", str(port), "--device", "cpu"], capsys, monkeypatch)
        assert line.startswith(f"error: --port {port}: the address 127.0.0.1:{port} is already in use")
    line = run_main(["--reward.specs", "redness:1", "--host", "no-such-host.invalid", "--device", "cpu"], capsys,
                    monkeypatch)
    assert line.startswith("error: --host 'no-such-host.invalid' cannot be resolved")
    line = run_main(["--reward.specs", "redness:1", "--port", "0", "--device", "cuda:99"], capsys, monkeypatch)
    assert line.startswith("error: --device 'cuda:99': ")
    monkeypatch.setenv(TOKEN_ENV, "s3cret\n")
    line = run_main(["--reward.specs", "redness:1", "--device", "cpu"], capsys, monkeypatch)
    assert line.startswith(f"error: {TOKEN_ENV} has a line break in it")
    monkeypatch.delenv(TOKEN_ENV)
    for flags, fragment in ((["--request-timeout", "0"], "--request-timeout 0.0 is invalid"),
                            (["--request-timeout", "1e300"], "--request-timeout 1e+300 is invalid"),
                            (["--max-connections", "0"], "--max-connections 0 is invalid")):
        line = run_main(["--reward.specs", "redness:1", "--device", "cpu", *flags], capsys, monkeypatch)
        assert line.startswith(f"error: {fragment}")
