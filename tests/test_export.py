"""fdfo/export.py: the diffusers export loads with `load_lora_weights` and reproduces the PEFT-loaded model, with
alpha != rank and a partial target list (where a missing LoRA config would silently give the wrong scale)."""

import pytest
import torch
from safetensors import safe_open

from fdfo import tiny
from fdfo.sd3 import LORA_TARGETS
from tests.fake_hub import make_adapter, tiny_transformer


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
