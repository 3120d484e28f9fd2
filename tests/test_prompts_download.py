"""`python -m fdfo.prompts download --out-dir`: checked before anything is downloaded (one `error:` line, exit 2,
no network touched); the set written whole, an existing one replaced (and said so)."""

import hashlib
import io
from pathlib import Path

import pytest

from fdfo import outputs, prompts


def no_network(*args, **kwargs):
    raise AssertionError("the download started")


def test_out_dir_is_checked_before_the_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prompts.urllib.request, "urlopen", no_network)
    monkeypatch.setitem(prompts.FETCHERS, "hpdv2", no_network)
    (tmp_path / "file").write_text("keep")
    (tmp_path / "holder" / "hpdv2.json").mkdir(parents=True)
    (tmp_path / "ro").mkdir()
    cases = [
        ("pickscore_train", tmp_path / "file", f"--out-dir '{tmp_path / 'file'}' is a file; give a folder path"),
        ("hpdv2", tmp_path / "file" / "sets", f"cannot be created: '{tmp_path / 'file'}' is a file, not a folder"),
        ("hpdv2", "", "--out-dir is empty; give a folder path"),
        ("hpdv2", tmp_path / "holder", f"--out-dir '{tmp_path / 'holder'}' holds a folder named hpdv2.json"),
        ("pickscore_train", tmp_path / "ro", f"--out-dir '{tmp_path / 'ro'}': the folder '{tmp_path / 'ro'}' is not "
                                             "writable"),
        ("hpdv2", tmp_path / "ro" / "sets", f"cannot be created: the folder '{tmp_path / 'ro'}' is not writable"),
    ]
    # a read-only folder (os.access stands in: the tests may run as root, which may write anywhere)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    for name, out_dir, message in cases:
        with pytest.raises(SystemExit) as e:
            prompts.main(["download", name, "--out-dir", str(out_dir)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
    assert (tmp_path / "file").read_text() == "keep"


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_an_existing_set_is_replaced_whole(tmp_path, monkeypatch, capsys):
    text = "".join(f"prompt {i}\n" for i in range(prompts.PICKSCORE_TRAIN_LINES))
    monkeypatch.setattr(prompts, "PICKSCORE_TRAIN_SHA256", hashlib.sha256(text.encode()).hexdigest())
    monkeypatch.setattr(prompts.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(text.encode()))
    out = tmp_path / "sets"
    prompts.main(["download", "pickscore_train", "--out-dir", str(out)])
    assert capsys.readouterr().out == f"wrote {out / 'pickscore_train.txt'} (25,432 prompts)\n"
    (out / "pickscore_train.txt").write_text("an older copy\n")
    prompts.main(["download", "pickscore_train", "--out-dir", str(out)])
    assert capsys.readouterr().out == f"replaced {out / 'pickscore_train.txt'} (25,432 prompts)\n"
    assert (out / "pickscore_train.txt").read_text() == text and [p.name for p in out.iterdir()] == [
        "pickscore_train.txt"]
