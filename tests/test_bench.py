"""fdfo.bench: the FLOP model (against the issue's FlopCounterMode counts of SD3.5-M) and the --tiny CPU run's JSON."""

import json
import threading

import pytest
import torch

from fdfo import bench
from fdfo.bench import epoch, flops


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    bench.main(["--tiny", "--out", str(out)])
    return json.loads(out.read_text())


def test_tiny_bench_writes_every_field_with_consistent_flops(tiny_record):
    r = tiny_record
    assert {"gpu", "torch", "diffusers", "peft", "world_size"} <= r["env"].keys()
    assert r["env"]["world_size"] == 1 and r["env"]["gpu"] is None
    f, steps = r["flops"], r["config"]["steps"]  # tiny defaults: 4 steps, 2 pairs, 64 px, no CFG
    assert steps == 4 and r["config"]["pairs_per_gpu"] == 2
    # per pair: 2 images x T forwards to sample, 2 x T training items, 2 decodes
    assert f["per_pair"]["sample"] == 2 * steps * f["fwd_per_image"]
    assert f["per_pair"]["train"] == 2 * steps * f["train_item"]
    assert f["per_pair"]["decode"] == 2 * f["decode_per_image"]
    for name in ("sample", "decode", "reward", "exchange", "train"):
        phase = r["phases"][name]
        assert phase["s_per_pair"] > 0, name
        assert phase["peak_mem_gb"] is None and phase["mfu"] is None  # CPU: no device memory, no peak table entry
    sample = r["phases"]["sample"]
    assert sample["achieved_tflops"] == pytest.approx(f["per_pair"]["sample"] / sample["s_per_pair"] / 1e12)
    total = r["total"]
    assert total["s_per_pair"] == pytest.approx(sum(p["s_per_pair"] for p in r["phases"].values()))
    assert total["epoch_s_projected"] == pytest.approx(total["s_per_pair"] * 432)
    assert total["mfu"] is None
    # rollouts held for training: 2 pairs x 2 samples x 4 timesteps x (16 x 8 x 8) latents x (4 + 4) bytes (fp32 CPU)
    assert r["rollout_gb_per_rank"] == pytest.approx(2 * 2 * 4 * 16 * 8 * 8 * 8 / 1e9)
    # the estimate train.py prints, for the bench's micro-batch (tests/test_memory.py checks the estimate itself)
    from fdfo.models import tiny_sd3 as tiny
    from fdfo.models.sd3 import activation_bytes as sd3_activation_bytes

    expected = sd3_activation_bytes(dict(tiny.TRANSFORMER_CONFIG), batch=r["config"]["train_batch"], latent_side=8,
                                    text_tokens=bench.TEXT_TOKENS, model_dtype=torch.float32, amp_dtype=None,
                                    lora_rank=8)
    assert r["activation_gb_estimate"] == pytest.approx(expected / 1e9)


def test_meta_flop_count_equals_a_real_forward_of_the_tiny_model():
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fdfo.models import tiny_sd3 as tiny

    counted = bench.count_flops(tiny=True, resolution=64, lora_rank=8)
    model = bench.with_lora(SD3Transformer2DModel(**tiny.TRANSFORMER_CONFIG).requires_grad_(False), 8)
    cfg = tiny.TRANSFORMER_CONFIG
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8), timestep=torch.ones(1),
                  encoder_hidden_states=torch.randn(1, bench.TEXT_TOKENS, cfg["joint_attention_dim"]),
                  pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]))
    # the math attention kernel runs as counted matmuls (the fused CPU kernel has no FLOP formula)
    with FlopCounterMode(display=False) as real, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs, return_dict=False)
    assert counted["fwd_per_image"] == real.get_total_flops()
    # backward through the frozen base costs about one more forward (input gradients only) plus the LoRA
    assert 1.9 < counted["train_item"] / counted["fwd_per_image"] < 2.6


def test_peak_table_and_user_errors():
    assert bench.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA H200", "fp32") is None and bench.peak_tflops(None, "bf16") is None
    with pytest.raises(ValueError, match="--pairs must be >= 1, got 0"):
        bench.parse_args(["--pairs", "0"])
    with pytest.raises(ValueError, match="--resolution 100 must be a multiple of 16"):
        bench.parse_args(["--resolution", "100"])
    with pytest.raises(ValueError, match="--decode-batch 0 must be between 1 and 8"):
        bench.parse_args(["--decode-batch", "0"])
    assert bench.bench_config(bench.parse_args(["--tiny"])).sample.decode_batch_size == 1  # training's default
    assert bench.bench_config(bench.parse_args(["--tiny", "--decode-batch", "3"])).sample.decode_batch_size == 3


@pytest.mark.slow
def test_full_shape_flops_match_the_issue_counts():
    """SD3.5-M at 512 px (1,024 image tokens + 205 text tokens): 2.247 TFLOP per forward, 4.769 per LoRA r32 item."""
    f = bench.count_flops(tiny=False, resolution=512)
    assert f["fwd_per_image"] / 1e12 == pytest.approx(2.247, rel=0.05)
    assert f["train_item"] / 1e12 == pytest.approx(4.769, rel=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# --reward pickscore [--overlap-rewards]


def _pickscore_epoch(monkeypatch, tmp_path, overlap: bool) -> tuple[dict, dict, dict, set]:
    """One tiny bench epoch with the tiny PickScore-shaped reward and two sampling batches (so the overlap has a batch
    to prepare while the next is sampled): (JSON record, rewards, trained LoRA tensors, threads that prepared)."""
    import threading

    from rewards import WeightedReward

    seen: dict = {}
    threads: set = set()
    sample_phase, train_phase = epoch.sample_phase, epoch.train_phase
    prepare = WeightedReward.prepare_components

    def sample_hook(policy, *args):
        samples = sample_phase(policy, *args)
        seen["rewards"] = {k: v.clone() for k, v in samples.rewards.items()}
        return samples

    def train_hook(policy, *args):
        out = train_phase(policy, *args)
        seen["lora"] = {k: v.detach().clone() for k, v in policy.transformer.named_parameters() if v.requires_grad}
        return out

    def prepare_hook(self, *args):
        threads.add(threading.current_thread().name)
        return prepare(self, *args)

    out = tmp_path / f"overlap{overlap}.json"
    with monkeypatch.context() as patch:  # undone on return: the next call wraps the originals again
        patch.setattr(epoch, "sample_phase", sample_hook)
        patch.setattr(epoch, "train_phase", train_hook)
        patch.setattr(WeightedReward, "prepare_components", prepare_hook)
        bench.main(["--tiny", "--reward", "pickscore", "--sample-batch", "1", "--steps", "2", "--gradient-steps", "1",
                    "--out", str(out)] + (["--overlap-rewards"] if overlap else []))
    return json.loads(out.read_text()), seen["rewards"], seen["lora"], threads


def test_tiny_pickscore_bench_with_overlap_is_the_same_epoch(monkeypatch, tmp_path):
    on, rewards_on, lora_on, threads_on = _pickscore_epoch(monkeypatch, tmp_path, overlap=True)
    off, rewards_off, lora_off, threads_off = _pickscore_epoch(monkeypatch, tmp_path, overlap=False)
    assert on["config"]["reward"] == off["config"]["reward"] == "pickscore"
    assert on["config"]["overlap_rewards"] is True and off["config"]["overlap_rewards"] is False
    from transformers.utils import is_torchvision_available  # the backend CLIPProcessor.from_pretrained would pick

    assert on["config"]["reward_processor"] == ("CLIPImageProcessor" if is_torchvision_available()
                                                else "CLIPImageProcessorPil")
    assert on["phases"]["reward"]["s_per_pair"] > 0 and off["phases"]["reward"]["s_per_pair"] > 0
    f = on["flops"]  # scoring a pair: 2 images through the image tower, 2 prompts through the text tower
    assert f["per_pair"]["reward"] == 2 * (f["reward_image"] + f["reward_text_per_prompt"]) > 0
    assert f["total_per_pair"] == sum(f["per_pair"].values())
    # the CLIP term really scored: 2 pairs x 2 images, finite and distinct (random weights, different images)
    assert set(rewards_on) == {"pickscore", "reward"} and rewards_on["reward"].shape == (4,)
    assert torch.isfinite(rewards_on["reward"]).all() and len(set(rewards_on["reward"].tolist())) == 4
    # the preparation ran in the worker thread with --overlap-rewards, on the main thread without
    assert {name.split("_")[0] for name in threads_on} == {"reward-prepare"}
    assert threads_off == {threading.main_thread().name}
    # and the epoch is the same bit for bit: rewards and the trained adapter
    assert rewards_on.keys() == rewards_off.keys()
    for key in rewards_on:
        assert torch.equal(rewards_on[key], rewards_off[key]), key
    assert lora_on.keys() == lora_off.keys() and len(lora_on) > 0
    for key in lora_on:
        assert torch.equal(lora_on[key], lora_off[key]), key


def test_overlap_with_the_stub_reward_is_refused_and_the_choice_is_recorded(tiny_record):
    with pytest.raises(ValueError, match="--overlap-rewards needs --reward pickscore: --reward stub has no"):
        bench.parse_args(["--tiny", "--overlap-rewards"])
    assert tiny_record["config"]["reward"] == "stub" and tiny_record["config"]["overlap_rewards"] is False


def test_report_tells_the_reward_models_apart(tiny_record, tmp_path):
    for name, extra in (("a", {}), ("b", dict(reward="pickscore")), ("c", dict(reward="pickscore",
                                                                               overlap_rewards=True))):
        record = dict(tiny_record, config=dict(tiny_record["config"], **extra))
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    text = bench.report_markdown(tmp_path)
    rows = tables(text)[0][1:]
    # columns: run, precision, compile, ckpt, pairs x T (sample batch), reward model, ...
    assert [row.split(" | ")[4:6] for row in rows] == [["2 x 4 (2)", "stub"], ["2 x 4 (2)", "pickscore"],
                                                       ["2 x 4 (2)", "pickscore + overlap"]]
    # the per-phase table: s/pair, TFLOP/s, MFU, peak GB of each phase (none on a CPU: "-")
    phases = tables(text)[1]
    assert phases[0] == "| run | sample | decode | reward | exchange | train |"
    train = tiny_record["phases"]["train"]
    assert phases[1].startswith("| a | ") and phases[1].endswith(
        f" | {train['s_per_pair']:.3f} s · {train['achieved_tflops']:.0f} TFLOP/s · - · - GB |")


def tables(text: str) -> list[list[str]]:
    """The markdown tables of a report, each as its lines without the |---| separator."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current += [line] if line.startswith("| ") else []
        elif current:
            found.append(current)
            current = []
    return found


def _vit_params(width: int, mlp: int, layers: int) -> int:
    """Parameters of `layers` pre-LN transformer blocks: q, k, v, out projections with biases, two LayerNorms, and a
    two-layer MLP with biases."""
    return layers * (4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp) + (mlp * width + width))


def test_vit_h14_builder_has_the_published_size():
    """CLIP ViT-H/14 by hand: 986,109,441 parameters; open_clip's docs/model_profile.csv lists ViT-H-14 as 986.11 M
    (image tower 632.08 M, text tower 354.03 M)."""
    from fdfo.bench import reward as bench_reward
    from fdfo.models.tiny_text import tiny_clip_tokenizer

    model = bench_reward.clip_model(tiny=False, tokenizer=tiny_clip_tokenizer(), device="meta")

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    # vision: 14 x 14 patch conv without bias, class token, 16 x 16 + 1 positions, LN before and after the
    # 32 blocks, projection 1280 -> 1024 without bias
    image = 3 * 14 * 14 * 1280 + 1280 + 257 * 1280 + 2 * 1280 + _vit_params(1280, 5120, 32) + 2 * 1280 + 1280 * 1024
    # text: 49408 token and 77 position embeddings, 24 blocks, final LN, projection 1024 -> 1024 without bias
    text = 49408 * 1024 + 77 * 1024 + _vit_params(1024, 4096, 24) + 2 * 1024 + 1024 * 1024
    assert count(model.vision_model, model.visual_projection) == image == 632_076_800
    assert count(model.text_model, model.text_projection) == text == 354_032_640
    assert count(model) == image + text + 1 == 986_109_441  # + logit_scale
    assert round(image / 1e6, 2) == 632.08 and round(text / 1e6, 2) == 354.03 and round(count(model) / 1e6, 2) == 986.11
    assert model.logit_scale.dtype == torch.float32 and model.config.vision_config.image_size == 224
    # the laion ViT-H/14 preprocessor_config.json: shortest edge 224 bicubic (PIL code 3), centre crop 224, CLIP stats
    image = bench_reward.clip_processor(tiny=False, tokenizer=tiny_clip_tokenizer()).image_processor
    assert image.size == {"shortest_edge": 224} and image.crop_size == {"height": 224, "width": 224}
    assert image.resample == 3 and image.do_resize and image.do_center_crop and image.do_normalize
    assert list(image.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(image.image_std) == [0.26862954, 0.26130258, 0.27577711]
    pixels = image(images=[torch.rand(3, 512, 384)], do_rescale=False, input_data_format="channels_first",
                   return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)


def test_reward_flops_on_meta_equal_a_real_forward_of_the_tiny_clip():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fdfo.bench import reward as bench_reward
    from fdfo.models.tiny_text import tiny_clip_tokenizer

    prompts = [f"prompt {i}" for i in range(3)]
    counted = bench_reward.count_flops(tiny=True, prompts=prompts)
    tokenizer = tiny_clip_tokenizer()
    model = bench_reward.clip_model(tiny=True, tokenizer=tokenizer, device="cpu")
    text = tokenizer(prompts, padding=True, return_tensors="pt")  # with its attention mask, as CLIPScorer calls it
    with FlopCounterMode(display=False) as image, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    with FlopCounterMode(display=False) as words, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
    assert counted["reward_image"] == image.get_total_flops() > 0
    assert counted["reward_text_per_prompt"] == words.get_total_flops() / 3 > 0


def test_vit_h14_image_flops_match_open_clip():
    """open_clip's docs/model_profile.csv: ViT-H-14 at 224 px, 334.59 GFLOP per image for the image tower."""
    from fdfo.bench import reward as bench_reward

    assert bench_reward.count_flops(tiny=False, prompts=["prompt 0"])["reward_image"] / 1e9 == pytest.approx(
        334.59, abs=0.005)


def _clip_text_params(vocab, width, mlp, layers, projection, positions=77):
    """CLIPTextModelWithProjection by hand: token + position embeddings; per layer q, k, v, out (weights and biases),
    two LayerNorms and the MLP; the final LayerNorm; the projection (no bias)."""
    per_layer = 4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp) + (mlp * width + width)
    return vocab * width + positions * width + layers * per_layer + 2 * width + width * projection


def _t5_encoder_params(vocab, d_model, inner, d_ff, layers, heads, buckets=32):
    """T5EncoderModel (gated GELU) by hand: the shared embedding; per layer q, k, v, o (no biases), wi_0, wi_1, wo and
    two RMSNorm weights; the relative position bias of the first layer; the final RMSNorm."""
    per_layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab * d_model + layers * per_layer + buckets * heads + d_model


def test_side_models_have_the_published_sizes():
    """SD3.5-M's text encoders: CLIP-L/14 123.65 M, OpenCLIP bigG/14 694.66 M, T5 v1.1 XXL encoder 4.762 B parameters;
    held in bf16 (11.16 GB), PickScore in fp32 (3.94 GB)."""
    from fdfo.bench.side import parameter_count, side_model_bytes, text_encoders

    expected = [_clip_text_params(49408, 768, 3072, 12, 768), _clip_text_params(49408, 1280, 5120, 32, 1280),
                _t5_encoder_params(32128, 4096, 64 * 64, 10240, 24, 64)]
    assert [parameter_count(m) for m in text_encoders(False)] == expected == [123_650_304, 694_659_840,
                                                                             4_762_310_656]
    sizes = side_model_bytes(False, with_pickscore=True)
    assert sizes == {"text_encoders": 2 * sum(expected), "pickscore": 4 * 986_109_441}


def test_holding_keeps_its_buffer_for_the_block_only():
    import weakref

    from fdfo.bench.side import holding

    context = holding(64, torch.device("cpu"))
    buffer = context.__enter__()
    alive = weakref.ref(buffer)
    del buffer  # as a `with` without `as` does
    assert alive() is not None and alive().numel() == 64
    context.__exit__(None, None, None)
    assert alive() is None


def test_tiny_bench_holds_the_side_models_while_sampling(monkeypatch, tmp_path):
    from fdfo.bench import side as bench_side

    held = []
    real = bench_side.holding

    def spy(nbytes, device):
        held.append(nbytes)
        return real(nbytes, device)

    monkeypatch.setattr(epoch, "holding", spy)
    record = bench.main(["--tiny", "--hold-side-models", "--out", str(tmp_path / "b.json")])
    sizes = bench_side.side_model_bytes(True, with_pickscore=True)
    assert record["side_models_gb"] == {k: v / 1e9 for k, v in sizes.items()}
    assert held == [sum(sizes.values())]  # one sampling phase (--tiny runs one epoch)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input refused before any work, with the bench's own flag names; outputs written whole; --report's skipped files


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "fdfo.bench", "--tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stdout == ""  # no FLOPs line: nothing was counted or measured
    assert proc.stderr == f"error: --out {str(tmp_path)!r} is a folder; give a file path\n"


BAD_FLAGS = [
    (["--resolution", "0"], "--resolution 0 must be a multiple of 16, at least 16"),
    (["--resolution=-32"], "--resolution -32 must be a multiple of 16, at least 16"),
    (["--resolution", "40"], "--resolution 40 must be a multiple of 16"),
    (["--guidance-scale", "nan"], "--guidance-scale nan must be a finite number"),
    (["--guidance-scale=-inf"], "--guidance-scale -inf must be a finite number"),
    (["--device", "cuda"], "--device 'cuda': CUDA is not available on this machine; use --device cpu"),
    (["--pairs", "3"], "--pairs 3 must be a multiple of 2 for --gradient-steps 4"),
    (["--sample-batch", "3"], r"--sample-batch 3 must divide --pairs 4; valid values: \[1, 2, 4\]"),
    (["--pairs", "4", "--train-batch", "0"], r"--train-batch 0 must divide the 2 samples per optimizer step"),
    (["--timesteps-per-sample", "41"], "--timesteps-per-sample 41 must be between 1 and --steps 40"),
    (["--decode-batch", str(2**70)], r"--decode-batch 1180591620717411303424 must be between 1 and 8 \(2 x --pairs 4"),
    (["--pairs", "2", "--gradient-steps", "2", "--decode-batch", "5"], "--decode-batch 5 must be between 1 and 4"),
    (["--memory-fraction", "nan"], r"--memory-fraction must be in \(0, 1\], got nan"),
    (["--out", ""], "--out is empty; give a file path"),
    (["--levers", "fast"], "--levers 'fast': give all, none, or a comma-separated list of base-dtype, peft-cast, "
                           "lora-cache, shared-cast"),
    (["--tiny", "--memory-fraction", "0.5"], "--memory-fraction caps CUDA memory and does nothing on a CPU"),
    (["--device", "cpu", "--memory-fraction", "0.5"], "--memory-fraction caps CUDA memory"),
]


def test_every_flag_is_checked_with_the_bench_names(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(epoch, "run", lambda args: pytest.fail("the bench ran"))
    monkeypatch.setattr(flops, "flops_record", lambda args: pytest.fail("the FLOPs were counted"))
    for flags, message in BAD_FLAGS:
        with pytest.raises(ValueError, match=message) as error:
            bench.main(flags)
        assert "--sample." not in str(error.value) and "--train." not in str(error.value), flags
    (tmp_path / "file").write_text("")
    for flags, message in ([["--flops-only", "--out", str(tmp_path)], "is a folder; give a file path"],
                           [["--out", str(tmp_path / "file" / "b.json")], "'.*file' is a file, not a folder"],
                           [["--report", str(tmp_path), "--out", str(tmp_path)], "--out .* is a folder"],
                           [["--report", str(tmp_path / "file")], "--report .*: no such folder"]):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            bench.main(flags)
    # a read-only folder (os.access stands in: the tests may run as root, which may write anywhere)
    from fdfo import outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="--out .*cannot be created: the folder .* is not writable"):
        bench.main(["--report", str(tmp_path), "--out", str(tmp_path / "new" / "report.md")])


def test_cpu_summary_has_no_gpu_numbers(tiny_record, capsys):
    bench.print_summary(tiny_record)
    cpu = capsys.readouterr().out
    assert "GPU" not in cpu and "TFLOP" not in cpu and "MFU" not in cpu and "peak" not in cpu
    f = tiny_record["flops"]
    assert f"forward {f['fwd_per_image'] / 1e6:.4g} MFLOP per image" in cpu
    assert f"   total: {tiny_record['total']['s_per_pair']:.3f} s/pair; rollouts" in cpu
    gpu = dict(tiny_record, env=dict(tiny_record["env"], gpu="NVIDIA H200"),
               total=dict(tiny_record["total"], mfu=0.25))
    bench.print_summary(gpu)
    assert "GPU-s/pair), MFU 25.0%" in capsys.readouterr().out
    assert bench.flop_text(2.247e12) == "2.247 TFLOP" and bench.flop_text(5.0e9) == "5 GFLOP"


def test_out_is_written_whole_and_replaced(tiny_record, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(epoch, "run", lambda args: tiny_record)
    out = tmp_path / "b.json"
    bench.main(["--tiny", "--out", str(out)])
    assert capsys.readouterr().out.endswith(f"wrote {out}\n") and json.loads(out.read_text()) == tiny_record
    bench.main(["--tiny", "--out", str(out)])
    assert capsys.readouterr().out.endswith(f"replaced {out}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # no temporary file left


def test_report_names_the_files_it_skips(tiny_record, tmp_path, capsys):
    (tmp_path / "good.json").write_text(json.dumps(tiny_record))
    (tmp_path / "flops.json").write_text(json.dumps({"config": {}, "flops": {}}))
    (tmp_path / "broken.json").write_text('{"total": ')
    (tmp_path / "partial.json").write_text(json.dumps({"total": {}, "config": {}}))
    (tmp_path / "list.json").write_text("[1, 2]")
    out = tmp_path / "report" / "benchmarks.md"
    result = bench.main(["--report", str(tmp_path), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"skipped {tmp_path / 'broken.json'}: not JSON (Expecting value: line 1 column 11 (char 10))",
        f"skipped {tmp_path / 'flops.json'}: not a measured bench record (no \"total\"; a --flops-only count)",
        f"skipped {tmp_path / 'list.json'}: not a measured bench record (no \"total\"; something else)",
        f"skipped {tmp_path / 'partial.json'}: a bench record without the fields the table shows (KeyError: "
        "'phases')",
        f"wrote {out}"]
    assert len(result["skipped"]) == 4
    rows = tables(out.read_text())[0]
    assert len(rows) == 2 and rows[1].startswith("| good | fp32 |")
