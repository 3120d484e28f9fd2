"""The repository as a newcomer meets it: presets that work from any folder, example outputs that git ignores, and a
test suite that no busy machine can fail (no test asserts how long something took)."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from fdfo.config import PRESETS
from fdfo.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", [name for name in PRESETS if name.startswith("smoke")])
def test_smoke_presets_find_their_prompts_from_any_folder(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = PRESETS[preset]()
    assert Path(cfg.prompt_file).is_absolute()
    assert load_prompts(cfg.prompt_file) == load_prompts(ROOT / "prompt_sets" / "smoke.txt")


# What the README's examples write when run in the repository folder.
EXAMPLE_OUTPUTS = ["out.jpg", "compare.jpg", "grid.png", "train-prompts.json", "hpdv2.json", "b.json",
                   "lora-diffusers/pytorch_lora_weights.safetensors", "runs/00000-smoke/log.jsonl"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_example_outputs_are_ignored_by_git_and_the_sources_are_not():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert [p for p in EXAMPLE_OUTPUTS if not ignored(p)] == []
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and [p for p in tracked if ignored(p)] == []


CLOCKS = {"time", "perf_counter", "monotonic", "perf_counter_ns", "monotonic_ns", "time_ns"}


def _reads_a_clock(node) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CLOCKS
               for n in ast.walk(node))


def _is_duration(node) -> bool:
    """`clock() - start`, or a variable named like a duration."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and _reads_a_clock(node):
        return True
    return isinstance(node, ast.Name) and any(w in node.id.lower() for w in ("elapsed", "duration", "took"))


def timed_assertions(source: str) -> list[int]:
    """Line numbers of `assert`s that compare a measured duration with a bound."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assert):
            for compare in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
                if any(_is_duration(side) for side in (compare.left, *compare.comparators)):
                    lines.append(node.lineno)
    return lines


def test_the_detector_finds_timed_assertions():
    source = ("import time\nstart = time.perf_counter()\nelapsed = time.perf_counter() - start\nassert elapsed < 180\n"
              "assert ok and time.time() - start < 10\nassert time.time() < deadline, 'a hang bound'\n"
              "assert results['elapsed_s'] > 0\n")
    assert timed_assertions(source) == [4, 5]


def test_no_test_asserts_wall_clock_time():
    """Speed belongs to the bench: a loaded machine must not fail the suite. Bounds against hangs (timeouts,
    deadlines in wait loops) are fine."""
    found = {p.name: timed_assertions(p.read_text()) for p in sorted((ROOT / "tests").glob("*.py"))}
    assert {name: lines for name, lines in found.items() if lines} == {}
