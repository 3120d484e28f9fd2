"""Named prompt sets: loading with a message that says how to get a missing set, and the two downloads tested offline
(HPDv2 from a fake Hugging Face dataset cache, the Pick-a-Pic list through a monkeypatched URL opener)."""

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from fdfo import prompts
from fdfo.prompts import HPDV2_STYLES, load_prompt_set, load_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_missing_named_set_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prompt_sets/ is looked up in the working directory
    with pytest.raises(FileNotFoundError) as error:
        load_prompt_set("hpdv2")
    assert "`python -m fdfo.prompts download hpdv2`" in str(error.value)
    assert "3,200" in str(error.value) and "--prompt-set" in str(error.value)
    with pytest.raises(FileNotFoundError, match="neither a prompt set .* nor an existing text file"):
        load_prompt_set("hpdv3")

    (tmp_path / "prompt_sets").mkdir()
    (tmp_path / "prompt_sets/hpdv2.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompt_set("hpdv2") == ["a cat", "a dog"]
    (tmp_path / "mine.txt").write_text("one\ntwo\n")
    assert load_prompt_set(str(tmp_path / "mine.txt")) == ["one", "two"]


def test_training_message_for_a_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_prompts(tmp_path / "pickscore_train.txt")
    for fragment in ("25,432 lines", "--prompt-file", "`python -m fdfo.prompts download pickscore_train`"):
        assert fragment in str(error.value)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fake_opener(text: str, seen: list):
    def urlopen(url, timeout=None):
        seen.append(url)
        return FakeResponse(text.encode("utf-8"))

    return urlopen


def test_pickscore_download(tmp_path, monkeypatch, capsys):
    seen = []
    lines = [f"prompt number {i} é" for i in range(25_432)]
    lines[10] += "  "  # trailing blanks and blank lines are dropped
    monkeypatch.setattr(prompts.urllib.request, "urlopen", fake_opener("\n".join(lines[:5] + [""] + lines[5:]), seen))
    path = prompts.download("pickscore_train", tmp_path / "sets")
    assert seen == ["https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/train.txt"]
    assert path == tmp_path / "sets/pickscore_train.txt"
    assert load_prompts(path) == [line.strip() for line in lines]
    assert path.read_text(encoding="utf-8").count("\n") == 25_432
    assert "warning" not in capsys.readouterr().err

    monkeypatch.setattr(prompts.urllib.request, "urlopen", fake_opener("a\nb\n\nc\n", seen))
    prompts.download("pickscore_train", tmp_path / "sets")
    assert "warning: pickscore_train has 3 prompts, expected 25,432" in capsys.readouterr().err
    assert load_prompts(path) == ["a", "b", "c"]


def test_pickscore_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(prompts.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="could not download .*train.txt.*by hand"):
        prompts.download("pickscore_train", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def fake_hpdv2_cache(cache: Path, per_style: int = 800) -> Path:
    commit = hashlib.sha1(b"zhwang/HPDv2").hexdigest()
    root = cache / "datasets--zhwang--HPDv2"
    for style in HPDV2_STYLES:
        entries = [f"{style} prompt {i}" for i in range(per_style)]
        entries[1] = f"a {style}\nwith  a line break"
        folder = root / "snapshots" / commit / "benchmark"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{style}.json").write_text(json.dumps(entries))
    (root / "refs").mkdir(parents=True)
    (root / "refs/main").write_text(commit)
    return cache


def run_download(cache: Path, tmp_path: Path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fdfo.prompts", "download", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hpdv2_download_from_the_hub_cache(tmp_path):
    cache = fake_hpdv2_cache(tmp_path / "hub")
    result = run_download(cache, tmp_path, "hpdv2", "--out-dir", str(tmp_path / "sets"))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "(3,200 prompts)" in result.stdout
    lines = (tmp_path / "sets/hpdv2.txt").read_text().splitlines()
    assert len(lines) == 3200
    # the fixed style order, 800 each, and a prompt with a line break kept on one line
    assert [lines[800 * k] for k in range(4)] == [f"{style} prompt 0" for style in HPDV2_STYLES]
    assert lines[1] == "a anime with a line break" and lines[3199] == "photo prompt 799"


def test_hpdv2_download_errors(tmp_path):
    result = run_download(tmp_path / "empty-hub", tmp_path, "hpdv2", "--out-dir", str(tmp_path / "sets"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: could not get benchmark/anime.json of the Hugging Face dataset zhwang/HPDv2" in result.stderr
    assert not (tmp_path / "sets/hpdv2.txt").exists()

    cache = fake_hpdv2_cache(tmp_path / "hub", per_style=799)
    result = run_download(cache, tmp_path, "hpdv2", "--out-dir", str(tmp_path / "sets"))
    assert result.returncode == 0, result.stderr
    assert "benchmark/photo.json holds 799 prompts, expected 800" in result.stderr
    assert "hpdv2 has 3,196 prompts, expected 3,200" in result.stderr

    result = run_download(cache, tmp_path, "parti")
    assert result.returncode == 2 and "invalid choice: 'parti'" in result.stderr
