"""fdfo/export.py: the diffusers export loads with `load_lora_weights` and reproduces the PEFT-loaded model, with
alpha != rank and a partial target list (where a missing LoRA config would silently give the wrong scale)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import LORA_TARGETS
from tests.fake_hub import make_adapter, tiny_transformer

ROOT = Path(__file__).resolve().parents[1]


def transformer_output(transformer):
    """The transformer's velocity on fixed random inputs of the tiny model's shapes (64 px, 205 text tokens)."""
    gen = torch.Generator().manual_seed(0)
    x, embeds = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 205, 96, generator=gen)
    pooled, timestep = torch.randn(2, 80, generator=gen), torch.tensor([500.0, 900.0])
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]


def test_export_reproduces_the_peft_model(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel

    from fdfo.export import main

    adapter = tmp_path / "fdfo-combined-reward-cfg-4.5" / "epoch-0000100"
    make_adapter(adapter, tiny_transformer(), rank=2, alpha=6, seed=5, targets=LORA_TARGETS[:6])
    out = tmp_path / "export"
    main([str(adapter), str(out)])  # python -m fdfo.export CHECKPOINT OUT_DIR
    stdout = capsys.readouterr().out
    assert "rank 2, alpha 6" in stdout and "guidance_scale=4.5" in stdout
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 6 * 2  # A and B for 6 targets in 2 blocks
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)

    peft_model = PeftModel.from_pretrained(tiny_transformer(), str(adapter))
    expected = transformer_output(peft_model)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_sd3_path())
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(out))
    exported = transformer_output(pipe.transformer)
    assert (exported - expected).abs().max() <= 1e-5
    assert (exported - base).abs().max() > 0.05  # the LoRA is loaded, not silently skipped


def test_export_bad_inputs(tmp_path, capsys):
    from fdfo.export import diffusers_lora, export, main

    with pytest.raises(SystemExit) as e:
        main(["https://huggingface.co/nvidia", str(tmp_path / "out")])
    assert e.value.code == 2 and "error: checkpoint 'https://huggingface.co/nvidia' names no repository" in \
        capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        export(str(tmp_path / "missing"), tmp_path / "out")
    with pytest.raises(ValueError, match="base model"):
        export("base", tmp_path / "out")
    with pytest.raises(ValueError, match="unexpected tensor names"):
        diffusers_lora({"transformer.x.lora_A.weight": torch.zeros(1)}, None)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_export_file_gets_the_umask_permissions(tmp_path, umask, mode):
    """safetensors creates its files 0600; the export is a file to share, so it gets what the umask gives (0666 &
    ~umask), like any file the user creates."""
    from fdfo.export import export

    adapter = tmp_path / "adapter"
    make_adapter(adapter, tiny_transformer(), rank=2, alpha=2, seed=1, targets=LORA_TARGETS[:2])
    before = os.umask(umask)
    try:
        path = export(str(adapter), tmp_path / "out")
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_export_of_a_diffusers_lora_is_the_same_file(tmp_path):
    """A diffusers-format folder is accepted as input too: exporting the export again gives the same tensors and
    LoRA settings."""
    from fdfo.export import export

    adapter = tmp_path / "adapter"
    make_adapter(adapter, tiny_transformer(), rank=2, alpha=6, seed=2, targets=LORA_TARGETS[:3])
    first = export(str(adapter), tmp_path / "one")
    second = export(str(tmp_path / "one"), tmp_path / "two")
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(list(a.keys())) == 2 * 3 * 2
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
        meta_a, meta_b = (json.loads(f.metadata()["lora_adapter_metadata"]) for f in (a, b))
    assert meta_a == meta_b and meta_a["transformer.r"] == 2 and meta_a["transformer.lora_alpha"] == 6


def run_export(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fdfo.export", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def test_unwritable_out_dir_is_refused_before_the_checkpoint_is_read(tmp_path):
    """OUT_DIR is checked first: with a checkpoint that does not exist, the message is about OUT_DIR (read after it,
    the checkpoint would be the error). One line, exit 2, no traceback, the file untouched."""
    (tmp_path / "file").write_text("keep")
    proc = run_export(str(tmp_path / "missing"), str(tmp_path / "file"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: OUT_DIR {str(tmp_path / 'file')!r} is a file; give a folder path\n"
    assert (tmp_path / "file").read_text() == "keep"
    assert "usage: python -m fdfo.export" in run_export("--help").stdout


def test_out_dir_checks_in_process(tmp_path, monkeypatch):
    from fdfo import outputs
    from fdfo.export import export

    (tmp_path / "file").write_text("keep")
    (tmp_path / "ro").mkdir()
    cases = [(tmp_path / "file" / "sub", f"'{tmp_path / 'file'}' is a file, not a folder"),
             ("", "OUT_DIR is empty; give a folder path"),
             (tmp_path / "ro", f"OUT_DIR '{tmp_path / 'ro'}': the folder '{tmp_path / 'ro'}' is not writable"),
             (tmp_path / "ro" / "new", f"cannot be created: the folder '{tmp_path / 'ro'}' is not writable")]
    # a read-only folder (os.access stands in: the tests may run as root, which may write anywhere)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    for out, message in cases:
        with pytest.raises(ValueError) as error:
            export(str(tmp_path / "missing"), out)
        assert message in str(error.value), (out, str(error.value))
    (tmp_path / "holder" / "pytorch_lora_weights.safetensors").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds a folder named pytorch_lora_weights.safetensors"):
        export(str(tmp_path / "missing"), tmp_path / "holder")


def test_an_earlier_export_is_replaced_whole_and_a_failed_one_leaves_it(tmp_path, monkeypatch, capsys):
    """The second export into the same folder says it replaced the first; one that fails while writing (a full disk
    here) leaves the earlier file byte for byte, and no temporary file or folder."""
    import errno

    from diffusers import StableDiffusion3Pipeline

    from fdfo.export import export, main

    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(tmp_path / name, tiny_transformer(), rank=2, alpha=2, seed=seed, targets=LORA_TARGETS[:2])
    out = tmp_path / "out"
    first = export(str(tmp_path / "a"), out)
    assert capsys.readouterr().out.startswith(f"wrote {first}: ")
    before = first.read_bytes()
    export(str(tmp_path / "b"), out)
    assert capsys.readouterr().out.startswith(f"replaced {first} (the earlier export there): ")
    after = first.read_bytes()
    assert after != before and sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]

    real = StableDiffusion3Pipeline.save_lora_weights

    def full_disk(save_directory, **kwargs):
        real(save_directory, **kwargs)  # the whole file is there, under the temporary name, when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusion3Pipeline, "save_lora_weights", staticmethod(full_disk))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "a"), str(out)])
    err = capsys.readouterr().err
    assert err.startswith(f"error: the disk is full: could not write {first.name} in {first.parent}"), err
    assert e.value.code == 2 and err.count("\n") == 1
    assert first.read_bytes() == after and sorted(p.name for p in out.iterdir()) == [first.name]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new" / "out").exists()  # a folder the failed export created is removed too


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_out_dir(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    proc = run_export(str(tmp_path / "missing"), str(tmp_path / "ro"))
    assert proc.returncode == 2
    assert proc.stderr == f"error: OUT_DIR '{tmp_path / 'ro'}': the folder '{tmp_path / 'ro'}' is not writable\n"
