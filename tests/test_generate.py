"""Generation (fdfo/generation.py) and generate.py: images equal to an independent diffusers pipeline (base model and
LoRAs loaded through PEFT / diffusers), unmerged named adapters, per-image seeding, diffusers-format LoRAs, damaged
adapters, guidance-scale memory, and the end-to-end grid from every checkpoint address form through an offline
fake hub."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdfo.generation import BaseModel, choose_base_model, load_generator, resolve_guidance
from fdfo.grid import BUILTIN_PROMPTS, GridLayout
from fdfo.hub import Checkpoint
from fdfo.models import tiny_sd3 as tiny
from tests.fake_hub import (
    BAD_REPO,
    CFG_45,
    FDFO_REPO,
    NFT_REPO,
    NO_CFG,
    build_checkpoint_cache,
    hub_env,
    make_adapter,
    tiny_transformer,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS, RES = 2, 64
PROMPTS = ["a red apple on a wooden table", "a lighthouse on a rocky coast at sunset"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_checkpoint_cache(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def base():
    return BaseModel(str(tiny.tiny_sd3_path()), torch.device("cpu"))


def local(hub, repo, subfolder=""):
    """The fake cache's own copy of a hub folder, used as a local checkpoint folder."""
    return next((hub["cache"] / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()) / subfolder


def generator(base, folder, **kwargs):
    return load_generator(None if folder is None else str(folder), base=base, num_steps=STEPS, resolution=RES,
                          **kwargs)


def warnings_in(text):
    return [line for line in text.splitlines() if line.startswith("warning: ")]


def to_uint8(images):
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).int()


def reference_images(prompts, seeds, guidance, peft_folder=None, diffusers_folder=None):
    """What diffusers' own pipeline gives, loaded independently of fdfo: a fresh StableDiffusion3Pipeline, the LoRA
    attached by PEFT's PeftModel.from_pretrained (PEFT folder) or diffusers' load_lora_weights (diffusers folder)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_sd3_path())
    pipe.set_progress_bar_config(disable=True)
    if peft_folder is not None:
        PeftModel.from_pretrained(pipe.transformer, str(peft_folder))  # wraps the pipeline's layers in place
    if diffusers_folder is not None:
        pipe.load_lora_weights(str(diffusers_folder))
    with torch.no_grad():
        return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                    num_inference_steps=STEPS, guidance_scale=guidance, height=RES, width=RES,
                    output_type="pt").images.float()


def assert_same_images(got, expected):
    """<= 1 level of 255 after 8-bit rounding; the tiny model on CPU is in fact exact to float rounding."""
    assert got.shape == expected.shape
    assert (to_uint8(got) - to_uint8(expected)).abs().max() <= 1
    assert (got - expected).abs().max() <= 1e-4


def test_resolve_guidance(capsys):
    assert resolve_guidance(None, None) == 1.0
    assert resolve_guidance(4.5, None) == 4.5
    assert resolve_guidance(4.5, 4.5) == 4.5 and resolve_guidance(None, 2.0) == 2.0
    assert not warnings_in(capsys.readouterr().err)
    assert resolve_guidance(4.5, 1.0, "hf:x/y/z") == 1.0
    (line,) = warnings_in(capsys.readouterr().err)
    assert "hf:x/y/z was trained with guidance scale 4.5" in line and "at 1" in line


def test_choose_base_model():
    plain = Checkpoint(None, "base model", "base model")
    ours = Checkpoint(Path("a"), "a", "a", pretrained_model="builtin:tiny-sd3")
    assert choose_base_model([plain]) == "stabilityai/stable-diffusion-3.5-medium"
    assert choose_base_model([plain, ours]) == "builtin:tiny-sd3"
    assert choose_base_model([ours], "my/model") == "my/model"


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_images_equal_the_diffusers_pipeline(base, hub, guidance):
    """Base model and a LoRA (rank 4, alpha 8: scale 2): the project's images equal an independent pipeline call with
    the same seeds, at guidance 1 (no CFG) and 3 (CFG against the empty prompt), and the LoRA really matters."""
    seeds = [4, 9]
    folder = local(hub, FDFO_REPO, NO_CFG)
    plain = generator(base, None, guidance_scale=guidance).generate(PROMPTS, seeds)
    assert_same_images(plain, reference_images(PROMPTS, seeds, guidance))
    tuned = generator(base, folder, guidance_scale=guidance).generate(PROMPTS, seeds)
    assert_same_images(tuned, reference_images(PROMPTS, seeds, guidance, peft_folder=folder))
    assert (tuned - plain).abs().mean() > 0.02
    assert (plain[0] - plain[1]).abs().mean() > 0.02


def test_adapters_are_unmerged_and_switch_by_name(base, hub):
    """Two adapters and the base model share one pipeline in any order: the base weights never change, each
    adapter's A and B sit beside them in fp32 under their own name, and every sampler keeps giving its own images."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    to_q = base.transformer.transformer_blocks[0].attn.to_q
    weight = to_q.get_base_layer().weight.detach().clone() if isinstance(to_q, LoraLayer) else \
        to_q.weight.detach().clone()
    samplers = [generator(base, f) for f in (local(hub, NFT_REPO), None, local(hub, FDFO_REPO, NO_CFG))]
    first = [s.generate(PROMPTS[:1], [3]) for s in samplers]
    again = [s.generate(PROMPTS[:1], [3]) for s in reversed(samplers)][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert (first[0] - first[1]).abs().mean() > 0.02 and (first[2] - first[0]).abs().mean() > 0.02
    to_q = base.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, LoraLayer) and not to_q.merged
    assert torch.equal(to_q.get_base_layer().weight, weight)  # never merged into the base weights
    state = load_file(str(local(hub, NFT_REPO) / "adapter_model.safetensors"))
    name = base.add(samplers[0].adapter)
    a = to_q.lora_A[name].weight
    assert a.dtype == torch.float32
    assert torch.equal(a, state["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert to_q.scaling[name] == 3.0  # alpha 6 / rank 2


def test_batches_and_large_seeds(base, hub):
    """Batch size does not change the images; seed s >= 2**31 is seed s % 2**31 (a CPU generator per image)."""
    gen = generator(base, local(hub, FDFO_REPO, NO_CFG))
    assert gen.guidance_scale == 1.0  # inferred from the folder name
    prompts, seeds = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [5, 6, 7]
    together = gen.generate(prompts, seeds, batch_size=2)
    assert together.shape == (3, 3, RES, RES) and together.dtype == torch.float32
    assert 0 <= together.min() and together.max() <= 1
    alone = torch.cat([gen.generate([p], [s]) for p, s in zip(prompts, seeds)])
    assert_same_images(together, alone)
    assert (together[0] - together[2]).abs().mean() > 0.02  # same prompt, other seed: another image
    assert torch.equal(gen.generate(prompts[:1], [5 + 2**31]), gen.generate(prompts[:1], [5]))
    assert torch.equal(gen.generate(prompts[:1], [5 + 3 * 2**31]), gen.generate(prompts[:1], [5]))


def assert_bf16_images_equal_the_peft_pipeline(hub, device, dtype, max_levels):
    """A bf16 base (the published protocol's, the default on CUDA) with the LoRA beside it in fp32: the project's images
    equal an independent bf16 pipeline with the LoRA attached by PEFT (which keeps adapter weights in fp32), at
    guidance 1 and 4.5, to `max_levels` of 255 after rounding both in bf16."""
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = local(hub, FDFO_REPO, CFG_45)
    bf16_base = BaseModel(str(tiny.tiny_sd3_path()), device, dtype=dtype)
    assert bf16_base.dtype == torch.bfloat16
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_sd3_path(), dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    PeftModel.from_pretrained(pipe.transformer, str(folder))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight.dtype == torch.float32
    seeds = [3, 2**31 + 4]
    for guidance in (1.0, 4.5):
        got = load_generator(str(folder), base=bf16_base, num_steps=4, resolution=128,
                             guidance_scale=guidance).generate(PROMPTS, seeds)
        with torch.no_grad():
            expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s % 2**31) for s in seeds],
                            num_inference_steps=4, guidance_scale=guidance, height=128, width=128,
                            output_type="pt").images.cpu()
        assert got.dtype == expected.dtype == torch.bfloat16
        assert (to_uint8(got) - to_uint8(expected)).abs().max() <= max_levels, guidance
    # the checkpoint's values themselves, not values rounded to bf16 on the way in
    layer = bf16_base.transformer.transformer_blocks[0].attn.to_q
    [name] = layer.lora_A.keys()
    state = load_file(str(folder / "adapter_model.safetensors"))
    stored = state["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert layer.lora_A[name].weight.dtype == torch.float32 and not layer.lora_A[name].weight.requires_grad
    assert torch.equal(layer.lora_A[name].weight.cpu(), stored.float())


def test_bf16_images_equal_the_diffusers_pipeline(hub):
    """On CPU the same kernels run in both: equal images. (Before the LoRA layers were made fp32 ahead of the copy,
    bf16-rounded LoRA weights put 7 of 255 levels between them.)"""
    assert_bf16_images_equal_the_peft_pipeline(hub, torch.device("cpu"), torch.bfloat16, max_levels=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_equal_the_diffusers_pipeline(hub):
    """On CUDA, where bf16 is the default: equal up to one level (kernels may differ by batch layout)."""
    assert_bf16_images_equal_the_peft_pipeline(hub, torch.device("cuda"), None, max_levels=1)


def diffusers_copy(peft_folder, out, metadata=True):
    """The PEFT adapter in diffusers' format, written by diffusers' save_lora_weights (with or without the LoRA config
    as adapter metadata)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    state = load_file(str(Path(peft_folder) / "adapter_model.safetensors"))
    tensors = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    config = LoraConfig.from_pretrained(str(peft_folder))
    meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=tensors,
                                               transformer_lora_adapter_metadata=meta if metadata else None)
    return out


def test_diffusers_format_loras_give_the_peft_images(base, hub, tmp_path):
    """The same weights as a diffusers file give the PEFT folder's images: with metadata (alpha 8 != rank 4), through
    fdfo.export, and without metadata when alpha = rank (the convention diffusers assumes); and equal diffusers'
    own load_lora_weights."""
    from fdfo.export import export

    seeds = [1, 2]
    folder = local(hub, FDFO_REPO, NO_CFG)
    peft_images = generator(base, folder).generate(PROMPTS, seeds)
    with_meta = generator(base, diffusers_copy(folder, tmp_path / "meta")).generate(PROMPTS, seeds)
    assert_same_images(with_meta, peft_images)
    export(str(folder), tmp_path / "export")
    assert_same_images(generator(base, tmp_path / "export").generate(PROMPTS, seeds), peft_images)
    assert_same_images(with_meta, reference_images(PROMPTS, seeds, 1.0, diffusers_folder=tmp_path / "meta"))

    equal = tmp_path / "alpha-equals-rank"
    make_adapter(equal, tiny_transformer(), rank=2, alpha=2, seed=11, std=0.6)
    no_meta = generator(base, diffusers_copy(equal, tmp_path / "nometa", metadata=False)).generate(PROMPTS, seeds)
    assert_same_images(no_meta, generator(base, equal).generate(PROMPTS, seeds))
    assert (no_meta - generator(base, None).generate(PROMPTS, seeds)).abs().mean() > 0.005


def test_non_finite_adapters_are_refused(base, hub, tmp_path):
    """A NaN or inf in either format: one ValueError naming the file, from load_generator and from fdfo.export."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fdfo.export import export

    for bad_value, kind in ((float("nan"), "peft"), (float("inf"), "diffusers")):
        folder = tmp_path / f"{kind}-bad"
        if kind == "peft":
            shutil.copytree(local(hub, FDFO_REPO, NO_CFG), folder)
            file = folder / "adapter_model.safetensors"
        else:
            diffusers_copy(local(hub, FDFO_REPO, NO_CFG), folder)
            file = folder / "pytorch_lora_weights.safetensors"
        state = load_file(str(file))
        key = sorted(state)[3]
        state[key][0, 0] = bad_value
        save_file(state, str(file), metadata={"format": "pt"} if kind == "peft" else None)
        for call, args in ((generator, (base, folder)), (export, (str(folder), tmp_path / "out"))):
            with pytest.raises(ValueError, match="NaN or infinite") as e:
                call(*args)
            assert str(file) in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, fragment", [("wrong-shape", "have another shape than the model"),
                                            ("wrong-target", "attn.to_qkv_fused")])
def test_adapters_that_do_not_fit_are_value_errors(base, hub, name, fragment):
    from peft.tuners.tuners_utils import BaseTunerLayer

    def adapters():
        return {(n, a) for n, m in base.transformer.named_modules() if isinstance(m, BaseTunerLayer)
                for a in m._all_available_adapter_names()}, sorted(getattr(base.transformer, "peft_config", {}))

    reference = generator(base, None).generate(PROMPTS[:1], [3])
    before = adapters()
    folder = local(hub, BAD_REPO, name)
    with pytest.raises(ValueError, match="does not fit the base model") as e:
        generator(base, folder)
    assert str(folder) in str(e.value) and fragment in str(e.value)
    assert adapters() == before  # the half-injected adapter is gone again
    assert torch.equal(generator(base, None).generate(PROMPTS[:1], [3]), reference)


def test_run_checkpoint_guidance_and_model_from_state_json(hub, tmp_path, capsys):
    """Our checkpoints remember their base model and CFG scale; overriding the scale warns once."""
    import json
    import shutil

    folder = tmp_path / "runs" / "00000-cfg" / "checkpoints" / "epoch-0000005"
    shutil.copytree(local(hub, FDFO_REPO, NO_CFG), folder)
    (folder / "state.json").write_text(json.dumps({"guidance_scale": 3.0, "pretrained_model": tiny.TINY_SD3}))
    gen = load_generator(str(tmp_path / "runs" / "00000-cfg"), num_steps=STEPS, resolution=RES,
                         device=torch.device("cpu"))
    assert gen.base.pretrained_model == tiny.TINY_SD3 and gen.guidance_scale == 3.0
    assert gen.checkpoint_description == str(folder)
    assert not warnings_in(capsys.readouterr().err)
    again = load_generator(str(folder), guidance_scale=1.0, base=gen.base, num_steps=STEPS, resolution=RES)
    assert again.guidance_scale == 1.0
    (line,) = warnings_in(capsys.readouterr().err)
    assert "trained with guidance scale 3" in line
    cfg3, cfg1 = gen.generate(PROMPTS[:1], [0]), again.generate(PROMPTS[:1], [0])
    assert (cfg3 - cfg1).abs().mean() > 0.02  # the scale is really used


def cells(path, layout, num_checkpoints):
    """The grid's images as float `[checkpoints, prompts * rows * cols, 3, S, S]`."""
    grid = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    out = torch.zeros(num_checkpoints, layout.num_prompts * layout.rows * layout.cols, 3, RES, RES)
    for k in range(num_checkpoints):
        for i in range(out.shape[1]):
            p, j = divmod(i, layout.rows * layout.cols)
            x, y = layout.cell(k, p, j // layout.cols, j % layout.cols)
            out[k, i] = torch.from_numpy(grid[y:y + RES, x:x + RES]).permute(2, 0, 1)
    return out


def run_generate(hub, tmp_path, *args):
    return subprocess.Popen([sys.executable, "generate.py", *map(str, args)], cwd=ROOT, env=hub_env(hub, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_generate_py_grid_from_every_address_form(hub, base, tmp_path):
    """One grid: FDFO no-cfg by browser URL, FDFO cfg-4.5 by hf:, DiffusionNFT by repo URL, and the base model.
    Every cell equals a direct generation with its seed; the cfg-4.5 block is sampled at 4.5 without being told."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ad = hub["adapters"]
    specs = [ad["no_cfg"]["url"], ad["cfg_4.5"]["hf"], ad["nft"]["url"], "base"]
    out = tmp_path / "grid.png"
    proc = run_generate(hub, tmp_path, "--checkpoint", *specs, "--out", out, "--prompts", tmp_path / "prompts.txt",
                        "--grid-rows", 1, "--grid-cols", 2, "--seed", 10, "--batch-size", 3, "--num-steps", STEPS,
                        "--resolution", RES)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"hf:{FDFO_REPO}/{CFG_45} on stabilityai/stable-diffusion-3.5-medium: guidance scale 4.5 (from the " \
           f"checkpoint's folder name)" in stderr + stdout
    assert f"hf:{NFT_REPO} on stabilityai/stable-diffusion-3.5-medium: guidance scale 1 (from the checkpoint's " \
           f"repository ({NFT_REPO} is known to use it))" in stderr + stdout
    assert not warnings_in(stderr)

    layout = GridLayout(num_checkpoints=4, num_prompts=2, rows=1, cols=2, image_size=RES)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == layout.size
    assert image.width == 4 * 2 * RES + 3 * layout.pad  # four blocks of two 64-px columns, with gaps
    got = cells(out, layout, 4)

    prompts = [p for p in PROMPTS for _ in range(2)]
    seeds = [10 + i for i in range(4)]
    folders = [local(hub, FDFO_REPO, NO_CFG), local(hub, FDFO_REPO, CFG_45), local(hub, NFT_REPO), None]
    for k, (folder, scale) in enumerate(zip(folders, [1.0, 4.5, 1.0, 1.0])):
        expected = generator(base, folder, guidance_scale=scale).generate(prompts, seeds)
        assert (got[k] - expected).abs().max() <= 2.5 / 255, k  # uint8 rounding and batch-size rounding
        if folder is not None:
            assert (got[k] - got[3]).abs().mean() > 0.02, k  # differs from the base model
    at_cfg_1 = generator(base, folders[1], guidance_scale=1.0).generate(prompts, seeds)
    assert (got[1] - at_cfg_1).abs().mean() > 0.02  # the 4.5 really was applied


def test_generate_py_bad_inputs_are_one_clear_message(hub, tmp_path, monkeypatch, capsys):
    """Malformed address, missing sub-folder (in-process, hub constants pointed at the fake cache) and an adapter
    that does not fit (a real offline subprocess): exit status 2 and one `error:` line saying what is wrong."""
    from huggingface_hub import constants

    import generate

    common = ["--num-steps", STEPS, "--resolution", RES, "--num-prompts", 1, "--grid-cols", 1]
    proc = run_generate(hub, tmp_path, "--checkpoint", hub["adapters"]["wrong_shape"]["hf"], "--out",
                        tmp_path / "shape.jpg", *common)  # runs while the in-process cases are checked
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cases = {
        f"https://huggingface.co/{FDFO_REPO}/commits/main": ["expected /tree/REVISION/FOLDER"],
        f"https://huggingface.co/{FDFO_REPO}/tree/main/fdfo-combined-reward-no-cfg/epoch-0000123":
            ["fdfo-combined-reward-no-cfg/epoch-0000123", "HF_HUB_OFFLINE=1"],
    }
    for spec, fragments in cases.items():
        with pytest.raises(SystemExit) as e:
            generate.main(["--checkpoint", spec, "--out", str(tmp_path / "bad.jpg"), *map(str, common)])
        assert e.value.code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert all(f in line for f in fragments), line

    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert f"adapter hf:{BAD_REPO}/wrong-shape does not fit the base model stabilityai/stable-diffusion-3.5-medium" \
        in line and "[4, 40] in the adapter, [4, 32] in the model" in line, line
    assert not list(tmp_path.glob("*.jpg"))


def test_jpeg_grid_of_builtin_prompts(tmp_path, capsys):
    from fdfo.grid import generate_grid
    from generate import GenerateConfig

    cfg = GenerateConfig(out=str(tmp_path / "g.jpg"), num_prompts=3, grid_rows=2, grid_cols=1, batch_size=4,
                         num_steps=1, resolution=RES, pretrained_model=str(tiny.tiny_sd3_path()), device="cpu")
    generate_grid(cfg)
    image = Image.open(tmp_path / "g.jpg")
    assert image.format == "JPEG" and image.size == GridLayout(1, 3, 2, 1, RES).size
    assert len(BUILTIN_PROMPTS) == 15 and "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="JPEG or PNG"):
        generate_grid(GenerateConfig(out=str(tmp_path / "g.gif")))


@pytest.mark.slow
def test_generate_py_under_torchrun_gives_the_single_process_grid(hub, tmp_path):
    """3 prompts x 1 image over 2 ranks (one rank pads its share): the same PNG as one process, up to rounding."""
    args = ["generate.py", "--checkpoint", str(local(hub, FDFO_REPO, NO_CFG)), "--num-prompts", "3", "--grid-cols",
            "1", "--num-steps", str(STEPS), "--resolution", str(RES), "--batch-size", "1",
            "--pretrained-model", str(tiny.tiny_sd3_path())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.png")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--out", str(tmp_path / "two.png")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("one", "two"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_unwritable_out_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """--out that is a folder, below a file, or in a read-only folder: exit 2 and one `error:` line, nothing loaded."""
    import generate
    from fdfo import generation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generation, "BaseModel", no_loading)
    monkeypatch.setattr(generation, "resolve_checkpoint", no_loading)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {tmp_path / "folder.png": "is a folder", tmp_path / "file" / "sub" / "g.png": "is a file, not a folder"}
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):  # root may write anywhere: the case cannot be tested then
        cases[read_only / "new" / "g.png"] = "is not writable"
    try:
        for out, fragment in cases.items():
            with pytest.raises(SystemExit) as e:
                generate.main(["--out", str(out), "--num-steps", "1"])
            assert e.value.code == 2
            (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
            assert f"--out {str(out)!r}" in line and fragment in line, line
    finally:
        read_only.chmod(0o755)
    assert not (tmp_path / "file" / "sub").exists() and not (read_only / "new").exists()


def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import generate
    from fdfo import generation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generation, "BaseModel", no_loading)
    monkeypatch.setattr(generation, "resolve_checkpoint", no_loading)
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", str(tmp_path / "g.png"), "--device", "tpu"])
    assert e.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert "--device 'tpu'" in line, line


def test_a_resolution_that_is_not_a_multiple_of_16_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import generate
    from fdfo import generation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generation, "BaseModel", no_loading)
    monkeypatch.setattr(generation, "resolve_checkpoint", no_loading)
    for resolution in ("100", "0"):
        with pytest.raises(SystemExit) as e:
            generate.main(["--out", str(tmp_path / "g.png"), "--resolution", resolution])
        assert e.value.code == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert f"--resolution must be a positive multiple of 16, got {resolution}" in line, line


def test_sampling_defaults_follow_a_tiny_models_training_and_the_protocol_otherwise():
    from fdfo.config import smoke_config
    from fdfo.generation import sampling_defaults
    from fdfo.models.sd3 import SD35_MEDIUM

    trained = Checkpoint(Path("a"), "a", "a", pretrained_model=tiny.TINY_SD3, resolution=32, num_steps=3)
    unknown = Checkpoint(None, "base model", "base model")
    smoke = smoke_config().sample
    assert sampling_defaults([unknown, trained], tiny.TINY_SD3) == (3, 32, "steps and size: the training run's")
    assert sampling_defaults([trained], tiny.TINY_SD3, resolution=48) == (3, 48, "steps: the training run's")
    assert sampling_defaults([unknown], tiny.TINY_SD3)[:2] == (smoke.num_solver_steps, smoke.resolution) == (6, 64)
    # SD3.5 checkpoints are sampled as the evaluation protocol says, whatever they were trained at (Flow-GRPO: 10)
    assert sampling_defaults([trained], SD35_MEDIUM)[:2] == (40, 512)
    assert sampling_defaults([trained], tiny.TINY_SD3, 5, 16) == (5, 16, "as requested")


def test_a_smoke_checkpoint_is_sampled_at_its_training_steps_and_size(hub, tmp_path, capsys):
    """state.json records the training resolution and steps; older checkpoints have them from their run's
    config.json. generate.py without --num-steps / --resolution uses them."""
    import json
    import shutil

    from fdfo.grid import generate_grid
    from generate import GenerateConfig

    run = tmp_path / "runs" / "00000-smoke"
    folder = run / "checkpoints" / "epoch-0000004"
    shutil.copytree(local(hub, FDFO_REPO, NO_CFG), folder)
    (folder / "state.json").write_text(json.dumps({"pretrained_model": tiny.TINY_SD3, "resolution": 32,
                                                   "num_solver_steps": 3}))
    gen = load_generator(str(run), device=torch.device("cpu"))
    assert (gen.num_steps, gen.resolution) == (3, 32)
    assert gen.generate(PROMPTS[:1], [0]).shape == (1, 3, 32, 32)
    (folder / "state.json").write_text(json.dumps({"pretrained_model": tiny.TINY_SD3}))  # an older checkpoint
    (run / "config.json").write_text(json.dumps({"sample": {"resolution": 48, "num_solver_steps": 2}}))
    again = load_generator(str(run), base=gen.base)
    assert (again.num_steps, again.resolution) == (2, 48)

    out = tmp_path / "grid.png"
    generate_grid(GenerateConfig(checkpoint=("base", str(run)), out=str(out), num_prompts=1, grid_cols=1,
                                 device="cpu"))
    assert Image.open(out).size == GridLayout(2, 1, 1, 1, 48).size  # the base model beside it, at its size
    printed = capsys.readouterr().out
    assert printed.count("2 Euler steps, 48 px (steps and size: the training run's)") == 2
    assert "base model on builtin:tiny-sd3: guidance scale 1 (the default: the checkpoint records no guidance " \
           "scale), 2 Euler steps, 48 px" in printed


def test_metrics_py_evaluates_a_smoke_checkpoint_at_its_training_steps_and_size(hub, tmp_path, capsys):
    """metrics.py as generate.py: without --num-steps / --resolution a tiny-model checkpoint is evaluated at the steps
    and size it was trained at, --compare's checkpoint at the same; a flag that differs from them gets one line."""
    import json
    import shutil

    from fdfo.evaluation import EvalConfig, evaluate, select_prompts

    run = tmp_path / "runs" / "00000-smoke"
    folder = run / "checkpoints" / "epoch-0000004"
    shutil.copytree(local(hub, FDFO_REPO, NO_CFG), folder)
    (folder / "state.json").write_text(json.dumps({"pretrained_model": tiny.TINY_SD3, "resolution": 32,
                                                   "num_solver_steps": 3}))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = dict(checkpoint=str(run), prompt_set=str(tmp_path / "prompts.txt"), num_prompts=1,
                  metrics=("redness",), device="cpu")
    results = evaluate(EvalConfig(compare="base", save_images=str(tmp_path / "images"), **common))
    assert [(results[k]["num_steps"], results[k]["resolution"]) for k in "ab"] == [(3, 32), (3, 32)]
    assert Image.open(tmp_path / "images" / "a" / "00000-00.png").size == (32, 32)
    assert Image.open(tmp_path / "images" / "b" / "00000-00.png").size == (32, 32)
    prompt = PROMPTS[select_prompts(len(PROMPTS), 1, 0)[0]]
    expected = load_generator(str(run), device=torch.device("cpu"), num_steps=3, resolution=32).generate([prompt], [0])
    saved = torch.from_numpy(np.array(Image.open(tmp_path / "images" / "a" / "00000-00.png"))).int()
    assert torch.equal(saved, to_uint8(expected)[0].permute(1, 2, 0))  # the 3-step images, not 40 or 6 steps
    out = capsys.readouterr()
    assert "3 Euler steps, 32 px" in out.out and not warnings_in(out.err)

    evaluate(EvalConfig(resolution=48, **common))
    assert warnings_in(capsys.readouterr().err) == [
        f"warning: {folder} was trained at 32 px; sampling it at 48 px gives images it was not trained on"]


def test_without_network_the_cache_still_loads_after_one_line(hub, tmp_path):
    """HF_HUB_OFFLINE unset and the hub a closed loopback port: one warning, then the cached adapter and base model."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in hub_env(hub, tmp_path).items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": endpoint}
    out = tmp_path / "g.png"
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", hub["adapters"]["no_cfg"]["hf"], "--out",
                             str(out), "--num-prompts", "1", "--grid-cols", "1", "--num-steps", str(STEPS),
                             "--resolution", str(RES)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = warnings_in(result.stderr)
    assert line.startswith(f"warning: the Hugging Face hub {endpoint} cannot be reached (ConnectError")
    assert "HF_HUB_OFFLINE=1" in line and "Retry" not in result.stderr
    assert Image.open(out).size == GridLayout(1, 1, 1, 1, RES).size
