"""The client of a reward server (rewards/remote.py) against misbehaving servers on 127.0.0.1 (issue 31, cases 5-6):
raw-socket fakes that cut an answer short, redirect, dribble or are no reward server at all; a token the HTTP header
cannot carry; requests larger than the server takes, refused before anything loads; no password in a recorded URL.
Every fake serves a bounded number of connections with socket timeouts and is stopped by the test that made it."""

import contextlib
import json
import socket
import threading
import time

import pytest

from fdfo import train_loop
from fdfo.config import check_config
from fdfo.errors import RunError
from rewards import RewardConfig, build_from_specs
from rewards.build import parse_spec
from rewards.remote import TOKEN_ENV, RewardServerDown
from tests.test_rewards_serve import eight_bit, serving
from tests.test_train import tiny_config

WAIT_S = 30
HEALTH = json.dumps({"names": ["x"], "weights": [1.0]}).encode()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return data
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while length and len(body) < length[0]:
        part = conn.recv(65536)
        if not part:
            break
        body += part
    return head


def answer(conn: socket.socket, status: str, body: bytes, *headers: str) -> None:
    head = "".join(f"{h}\r\n" for h in (f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers))
    conn.sendall(head.encode() + b"\r\n" + body)


@contextlib.contextmanager
def fake_server(reply, connections: int = 10):
    """A raw-socket HTTP "server" on 127.0.0.1 answering at most `connections` connections with `reply(conn, head)`;
    yields (URL, the request heads seen)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    seen, stop = [], threading.Event()

    def loop():
        while not stop.is_set() and len(seen) < connections:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT_S)
                seen.append(read_request(conn))
                with contextlib.suppress(OSError):
                    reply(conn, seen[-1])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
        listener.close()


def healthy_then(post):
    """A reply that answers the health check properly and POSTs with `post(conn)`."""

    def reply(conn, head):
        if head.startswith(b"GET /health"):
            answer(conn, "200 OK", HEALTH)
        else:
            post(conn)

    return reply


def test_an_answer_cut_short_is_retried_then_the_server_is_down():
    def cut(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"scores\": ")  # 11 of 100 bytes, then close

    with fake_server(healthy_then(cut)) as (url, seen):
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(remote_retries=1), "cpu")
        with pytest.raises(RewardServerDown, match=r"did not answer \(ChunkedEncodingError, 2 attempt\(s\)"):
            reward.components(["a"], eight_bit(1))
    assert [h.split(b" ")[0] for h in seen] == [b"GET", b"POST", b"POST"]


@pytest.mark.parametrize("where", ["health", "score"])
def test_a_redirect_is_not_followed_and_the_token_stays(where, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    with fake_server(lambda conn, head: answer(conn, "200 OK", HEALTH)) as (elsewhere, robbed):
        def redirect(conn):
            answer(conn, "307 Temporary Redirect", b"", f"Location: {elsewhere}/{where}")

        reply = healthy_then(redirect) if where == "score" else (lambda conn, head: redirect(conn))
        with fake_server(reply) as (url, seen):
            redirected = f"{url} answered .* with HTTP 307 \\(redirect to {elsewhere}/{where}\\)"
            with pytest.raises(RunError, match=redirected):
                build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu").components(["a"], eight_bit(1))
    assert robbed == [] and all(b"Authorization: Bearer s3cret" in head for head in seen)


def test_an_answer_that_dribbles_is_cut_at_the_deadline():
    sent = []

    def dribble(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
        for _ in range(40):  # 40 bytes, one each 0.25 s: 10 s in all, far past the 1 s deadline
            conn.sendall(b" ")
            sent.append(1)
            time.sleep(0.25)

    with fake_server(healthy_then(dribble)) as (url, _):
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(remote_timeout=1, remote_retries=0), "cpu")
        with pytest.raises(RewardServerDown, match=r"did not answer \(ReadTimeout|\(Timeout"):
            reward.components(["a"], eight_bit(1))
    assert len(sent) < 40  # the client hung up before the answer was complete


def test_a_server_that_is_no_reward_server_is_one_line():
    page = b"<!DOCTYPE HTML>\n<html>\n<head>\n<title>Error</title>\n</head>\n<body>\n<h1>404</h1>\n<p>Not Found</p>\n" \
           b"</body>\n</html>\n"
    with fake_server(lambda conn, head: answer(conn, "404 Not Found", page)) as (url, _):
        with pytest.raises(RunError) as e:
            build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"reward server {url} refused the health check: HTTP 404: ")
    assert message.endswith("is it a reward server, python -m rewards.serve?)")


def test_a_token_with_a_line_break_says_so(monkeypatch):
    with fake_server(lambda conn, head: answer(conn, "200 OK", HEALTH)) as (url, seen):
        monkeypatch.setenv(TOKEN_ENV, "s3cret\n")
        with pytest.raises(ValueError, match=f"{TOKEN_ENV} has a line break in it"):
            build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
    assert seen == []  # refused before any request


def test_requests_larger_than_the_server_takes_are_refused_before_anything_loads(tmp_path):
    with serving(["redness:1"], max_request_mb=0.1) as url:
        cfg = tiny_config(tmp_path / "run")  # 64 px images, --reward.chunk-size 16: about 0.27 MiB per request
        cfg.reward = RewardConfig(specs=(f"remote:1:{url}",))
        with pytest.raises(ValueError, match=r"--reward.chunk-size 16: requests of 16 images of 64 px are about "
                                             r"0.27 MiB, more than the 0.10 MiB .*; lower --reward.chunk-size to 6 "):
            train_loop.train(cfg)
        assert not (tmp_path / "run").exists()
        cfg.reward = RewardConfig(specs=(f"remote:1:{url}",), chunk_size=6)  # what the message says fits
        check_config(cfg)


def test_a_password_in_a_reward_server_url_is_refused_and_never_shown(tmp_path):
    with serving(["redness:1"]) as url:
        secret_url = url.replace("http://", "http://trainer:pa55word@")
        cfg = tiny_config(tmp_path / "run")
        cfg.reward = RewardConfig(specs=(f"remote:1:{secret_url}",))
        with pytest.raises(ValueError) as e:
            train_loop.train(cfg)
    assert f"remote:1:{url.replace('http://', 'http://***@')}" in str(e.value)
    assert "user name or password" in str(e.value) and TOKEN_ENV in str(e.value) and "pa55word" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError) as e:
        parse_spec("remote:x:http://trainer:pa55word@host:8000")  # any message about such a spec hides it
    assert "weight 'x'" in str(e.value) and "pa55word" not in str(e.value)


def test_a_compressed_answer_is_read_like_requests_reads_it():
    import gzip

    reply = healthy_then(lambda conn: answer(conn, "200 OK", gzip.compress(json.dumps(
        {"scores": {"x": [0.25], "reward": [0.25]}}).encode()), "Content-Encoding: gzip"))
    with fake_server(reply) as (url, _):
        reward = build_from_specs([f"remote:1:{url}"], RewardConfig(), "cpu")
        assert reward.components(["a"], eight_bit(1))["x"].tolist() == [0.25]
