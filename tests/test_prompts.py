"""Named prompt sets: loading with a message that says how to get a missing set, the pinned and verified downloads
tested offline (HPDv2 from a fake Hugging Face dataset cache or a monkeypatched hf_hub_download, the Pick-a-Pic list
through a monkeypatched URL opener), and the published evaluation subset's sha256 when the real file is present."""

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fdfo import prompts
from fdfo.evaluation import select_prompts
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
    (tmp_path / "prompt_sets/hpdv2.txt").write_text("a cat\n")  # the old text form is not read any more
    with pytest.raises(FileNotFoundError, match="prompt_sets/hpdv2.json not found"):
        load_prompt_set("hpdv2")
    (tmp_path / "prompt_sets/hpdv2.json").write_text(json.dumps(["a cat", "  a dog  ", "two\nlines"]))
    assert load_prompt_set("hpdv2") == ["a cat", "  a dog  ", "two\nlines"]  # verbatim
    (tmp_path / "prompt_sets/pickscore_train.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompt_set("pickscore_train") == ["a cat", "a dog"]  # [line.strip() ... if line.strip()]
    (tmp_path / "mine.txt").write_text("one\ntwo\n")
    assert load_prompt_set(str(tmp_path / "mine.txt")) == ["one", "two"]
    (tmp_path / "mine.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="mine.json is not a JSON list of prompt strings"):
        load_prompt_set(str(tmp_path / "mine.json"))


def test_a_prompt_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompt file {path} is not UTF-8 text \\(byte 5"):
        load_prompts(path)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        load_prompt_set(str(path))


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


PINNED_URL = ("https://raw.githubusercontent.com/yifan123/flow_grpo/9745241cf1101407e9b518dd4f10498092150522/"
              "dataset/pickscore/train.txt")


def pin(monkeypatch, text: str) -> None:
    """Make `text` the pinned file (its sha256; the line count stays 25,432)."""
    monkeypatch.setattr(prompts, "PICKSCORE_TRAIN_SHA256", hashlib.sha256(text.encode("utf-8")).hexdigest())


def test_pickscore_download(tmp_path, monkeypatch, capsys):
    assert prompts.PICKSCORE_TRAIN_URL == PINNED_URL and prompts.PICKSCORE_TRAIN_LINES == 25_432
    assert prompts.PICKSCORE_TRAIN_SHA256 == "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f"
    seen = []
    text = "".join(f"prompt number {i} é\n" for i in range(25_432))
    pin(monkeypatch, text)
    monkeypatch.setattr(prompts.urllib.request, "urlopen", fake_opener(text, seen))
    path = prompts.download("pickscore_train", tmp_path / "sets")
    assert seen == [PINNED_URL]
    assert path == tmp_path / "sets/pickscore_train.txt"
    assert path.read_bytes() == text.encode("utf-8")  # stored unchanged
    assert load_prompts(path) == [f"prompt number {i} é" for i in range(25_432)]
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("".join(f"prompt {i}\n" for i in range(25_431)), "holds 25,431 prompts, expected 25,432"),
    ("".join(f"prompt {i}\n" for i in range(25_432)) + "\n", "has sha256 "),  # right count, other bytes
    ("".join(f"prompt {i}\n" for i in range(25_432)) + "\udcff", "not UTF-8"),  # a 0xff byte
])
def test_pickscore_download_that_fails_a_check_writes_nothing(tmp_path, monkeypatch, text, message):
    pin(monkeypatch, "".join(f"prompt {i}\n" for i in range(25_432)))
    data = text.encode("utf-8", errors="surrogateescape")
    monkeypatch.setattr(prompts.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(data))
    with pytest.raises(ValueError, match=message) as error:
        prompts.download("pickscore_train", tmp_path / "sets")
    assert "nothing was written" in str(error.value)
    assert not (tmp_path / "sets").exists() or not list((tmp_path / "sets").iterdir())


def test_pickscore_download_is_pinned(tmp_path):
    with pytest.raises(ValueError, match="pinned to flow_grpo commit 9745241c.*applies to hpdv2 only"):
        prompts.download("pickscore_train", tmp_path, revision="main")


def test_pickscore_test_download_is_pinned_and_verified(tmp_path, monkeypatch):
    """The held-out prompts of the paper presets: Flow-GRPO's test.txt at the same commit, checked like train.txt."""
    test_url = PINNED_URL.replace("/train.txt", "/test.txt")
    assert prompts.PICKSCORE_TEST_URL == test_url and prompts.PICKSCORE_TEST_LINES == 2_048
    assert prompts.PICKSCORE_TEST_SHA256 == "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"
    text = "".join(f"held-out prompt {i}\n" for i in range(2_048))
    monkeypatch.setattr(prompts, "PICKSCORE_TEST_SHA256", hashlib.sha256(text.encode("utf-8")).hexdigest())
    seen = []
    monkeypatch.setattr(prompts.urllib.request, "urlopen", fake_opener(text, seen))
    path = prompts.download("pickscore_test", tmp_path / "sets")
    assert seen == [test_url] and path == tmp_path / "sets/pickscore_test.txt"
    assert path.read_bytes() == text.encode("utf-8") and len(load_prompt_set(str(path))) == 2_048
    short = "".join(f"held-out prompt {i}\n" for i in range(2_047))
    for other, message in ((text + "\n", "has sha256 "), (short, "holds 2,047 prompts, expected 2,048")):
        monkeypatch.setattr(prompts.urllib.request, "urlopen", fake_opener(other, seen))
        with pytest.raises(ValueError, match=message):
            prompts.download("pickscore_test", tmp_path / "other")
        assert not (tmp_path / "other/pickscore_test.txt").exists()
    with pytest.raises(ValueError, match="pickscore_test is pinned to flow_grpo commit 9745241c"):
        prompts.download("pickscore_test", tmp_path, revision="main")


PUBLISHED_SUBSET_SHA256 = "2118abaab5aa2d42740a6e60f8869d6b29f84264dab76cbc12c14522d448e4c8"


@pytest.mark.skipif(not (ROOT / "prompt_sets/pickscore_train.txt").is_file(),
                    reason="prompt_sets/pickscore_train.txt is not here (fetch it with "
                           "`python -m fdfo.prompts download pickscore_train`)")
def test_the_published_pickscore_evaluation_subset():
    path = ROOT / "prompt_sets/pickscore_train.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == prompts.PICKSCORE_TRAIN_SHA256
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 25_432
    shuffled = list(lines)
    np.random.RandomState(0).shuffle(shuffled)
    assert hashlib.sha256("\n".join(shuffled[:4096]).encode("utf-8")).hexdigest() == PUBLISHED_SUBSET_SHA256
    ours = [lines[i] for i in select_prompts(len(lines), 4096, prompt_seed=0)]  # what metrics.py evaluates
    assert hashlib.sha256("\n".join(ours).encode("utf-8")).hexdigest() == PUBLISHED_SUBSET_SHA256


def test_pickscore_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(prompts.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="could not download .*train.txt.*by hand"):
        prompts.download("pickscore_train", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


HPDV2_ODD = ["  leading and trailing blanks  ", "a line\nbreak and\ttab", "double  space", "\u2028 separator"]


def hpdv2_entries(style: str, count: int = 800) -> list[str]:
    entries = [f"{style} prompt {i}" for i in range(count)]
    entries[1:1 + len(HPDV2_ODD)] = [f"{style}{odd}" for odd in HPDV2_ODD]
    return entries


def fake_hpdv2_cache(cache: Path, per_style: int = 800) -> Path:
    commit = hashlib.sha1(b"zhwang/HPDv2").hexdigest()
    root = cache / "datasets--zhwang--HPDv2"
    for style in HPDV2_STYLES:
        folder = root / "snapshots" / commit / "benchmark"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{style}.json").write_text(json.dumps(hpdv2_entries(style, per_style)))
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
    stored = json.loads((tmp_path / "sets/hpdv2.json").read_text(encoding="utf-8"))
    # the fixed style order, 800 each, every prompt verbatim (blanks, line breaks, tabs, U+2028 kept)
    assert stored == sum((hpdv2_entries(style) for style in HPDV2_STYLES), [])
    assert stored[1] == "anime  leading and trailing blanks  " and stored[2] == "animea line\nbreak and\ttab"
    assert not (tmp_path / "sets/hpdv2.txt").exists()


def fake_hf_hub_download(monkeypatch, per_style: dict, folder: Path, calls: list):
    import huggingface_hub

    def download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        style = filename.removeprefix("benchmark/").removesuffix(".json")
        path = folder / f"{style}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(hpdv2_entries(style, per_style.get(style, 800))))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_hpdv2_download_checks_counts_and_passes_the_revision(tmp_path, monkeypatch):
    calls = []
    fake_hf_hub_download(monkeypatch, {}, tmp_path / "files", calls)
    path = prompts.download("hpdv2", tmp_path / "sets", revision="abc123")
    assert calls == [("zhwang/HPDv2", f"benchmark/{style}.json", "dataset", "abc123") for style in HPDV2_STYLES]
    assert load_prompt_set(str(path)) == sum((hpdv2_entries(style) for style in HPDV2_STYLES), [])

    fake_hf_hub_download(monkeypatch, {"paintings": 801}, tmp_path / "files", calls)
    with pytest.raises(ValueError, match="paintings.json holds 801 prompts, expected 800.*nothing was written"):
        prompts.download("hpdv2", tmp_path / "other")
    assert not (tmp_path / "other/hpdv2.json").exists()


def test_hpdv2_download_errors(tmp_path):
    result = run_download(tmp_path / "empty-hub", tmp_path, "hpdv2", "--out-dir", str(tmp_path / "sets"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: could not get benchmark/anime.json of the Hugging Face dataset zhwang/HPDv2" in result.stderr
    assert not (tmp_path / "sets/hpdv2.json").exists()

    result = run_download(tmp_path / "empty-hub", tmp_path, "parti")
    assert result.returncode == 2 and "invalid choice: 'parti'" in result.stderr
