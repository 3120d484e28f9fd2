"""Tests for fdfo.models.tiny_sd3: the offline tiny SD3 pipeline must load and behave like the real one, only small."""

import copy
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fdfo.models import tiny_sd3 as tiny

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
GEN = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=128, output_type="pt")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    return tiny.build_tiny_sd3(tmp_path_factory.mktemp("build") / "tiny-sd3", seed=0)


@pytest.fixture(scope="module")
def pipe(built):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(built)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of every component, keyed by 'component/file:tensor'."""
    out = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        for key, value in load_file(file).items():
            out[f"{file.parent.name}/{file.name}:{key}"] = value
    return out


def test_clip_tokenizer_wraps_pads_and_truncates(tmp_path):
    tok = tiny.tiny_clip_tokenizer()
    assert len(tok) == 1024 and tok.model_max_length == 77
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>") == 1022
    assert ids[6] == tok.convert_tokens_to_ids("<|endoftext|>") == 1023
    assert ids[7:] == [tok.pad_token_id] * 70 and tok.pad_token_id == 1023
    long = tok(" ".join(["cat"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 1022 and long[-1] == 1023 and long[1:-1] == [long[1]] * 75

    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "An astronaut, riding a GREEN horse! 42"
    assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(text).input_ids, skip_special_tokens=True) == "an astronaut , riding a green horse ! 4 2"
    assert tiny.tiny_clip_tokenizer(pad_token="!").pad_token_id == tok.convert_tokens_to_ids("!")


def test_t5_tokenizer_layout():
    tok = tiny.tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) > 600 and "<extra_id_0>" in tok.get_vocab()
    ids = tok("A photo of a red Cat, 3 dogs!").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>; plain ASCII never falls back to <unk>
    assert tok.decode(ids, skip_special_tokens=True) == "A photo of a red Cat, 3 dogs!"
    assert tok.get_vocab() == tiny.tiny_t5_tokenizer().get_vocab()


def test_loaded_pipeline_config(pipe):
    t = pipe.transformer.config
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == t.in_channels == t.out_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.pooled_projection_dim == proj
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.tokenizer_2.pad_token == "!"


def test_encode_prompt_shapes(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=["a red cat", "an astronaut riding a horse"], prompt_2=None, prompt_3=None, device="cpu",
        num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=128,
    )  # fmt: skip
    width = pipe.transformer.config.joint_attention_dim
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert embeds.shape == (2, 77 + 128, width) and pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)
    assert neg is None and neg_pooled is None
    assert clip_width < width and embeds[:, :77, clip_width:].abs().max() == 0  # CLIP states zero-padded to T5 width
    assert embeds[:, :77, :clip_width].std() > 0.1 and embeds[:, 77:].std() > 0.1
    assert (embeds[0] - embeds[1]).abs().mean() > 0.01 and (pooled[0] - pooled[1]).abs().mean() > 0.1


def test_same_seed_same_weights_other_seed_differs(built, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = tiny.build_tiny_sd3(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_next), "building must not move the caller's RNG"

    first, second = _weights(built), _weights(again)
    assert first.keys() == second.keys() and len(first) > 100
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in ("model_index.json", "tokenizer/tokenizer.json", "tokenizer_3/tokenizer.json", "vae/config.json"):
        assert (built / name).read_bytes() == (again / name).read_bytes()

    other_dir = tiny.build_tiny_sd3(tmp_path / "other", seed=1)
    other = load_file(other_dir / "transformer/diffusion_pytorch_model.safetensors")
    ours = {k.split(":", 1)[1]: v for k, v in first.items() if k.startswith("transformer/")}
    assert other.keys() == ours.keys()
    assert not torch.equal(other["proj_out.weight"], ours["proj_out.weight"])


def test_second_call_does_not_rebuild(built):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}
    siblings = sorted(built.parent.iterdir())
    assert tiny.build_tiny_sd3(built, seed=1) == built  # even another seed: the folder is there, so it is kept
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before
    assert sorted(built.parent.iterdir()) == siblings == [built]  # no temporary folder left behind


class _FakePipeline:
    """Stands in for the real pipeline so the rename logic is tested without building models."""

    def __init__(self, on_save):
        self.on_save = on_save

    def save_pretrained(self, folder):
        (pathlib.Path(folder) / "model_index.json").write_text("{}")
        self.on_save(pathlib.Path(folder))


def test_losing_a_race_keeps_the_winners_build(tmp_path, monkeypatch):
    out = tmp_path / "model"

    def another_process_wins(_):
        out.mkdir()
        (out / "model_index.json").write_text('{"winner": true}')

    monkeypatch.setattr(tiny, "_pipeline", lambda: _FakePipeline(another_process_wins))
    assert tiny.build_tiny_sd3(out) == out
    assert (out / "model_index.json").read_text() == '{"winner": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_crash_leaves_nothing_and_foreign_folder_is_an_error(tmp_path, monkeypatch):
    def crash(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_pipeline", lambda: _FakePipeline(crash))
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_tiny_sd3(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(tiny, "_pipeline", lambda: _FakePipeline(lambda _: None))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="model_index.json"):
        tiny.build_tiny_sd3(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_builtin_name_resolves_to_cache(built, tmp_path, monkeypatch):
    shutil.copytree(built, tmp_path / tiny._CACHE_NAME)  # pre-seed the cache so no build is needed
    monkeypatch.setenv("FDFO_TINY_CACHE", str(tmp_path))  # set after import: the variable must be read per call
    assert tiny.tiny_sd3_path() == tmp_path / tiny._CACHE_NAME
    assert tiny.resolve_builtin(tiny.TINY_SD3) == str(tmp_path / tiny._CACHE_NAME)
    assert tiny.resolve_builtin("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"


def test_generation_is_a_varied_image(pipe):
    def generate(prompt, seed):
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **GEN).images

    image = generate("a red cat", 0)
    assert image.shape == (1, 3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.1 and image.std(dim=(2, 3)).min() > 0.05  # structure within each channel, not a flat fill
    assert torch.equal(image, generate("a red cat", 0))
    assert (image - generate("a red cat", 1)).abs().mean() > 0.05  # the noise matters
    assert (image - generate("an astronaut riding a horse on the moon", 0)).abs().mean() > 0.02  # the prompt matters


def test_velocity_depends_on_x_t_and_prompt(pipe):
    """The random init is amplified so that none of the three inputs is ignored (see tiny.amplify_conditioning)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=["a red cat", "an astronaut riding a horse"], prompt_2=None, prompt_3=None, device="cpu",
        do_classifier_free_guidance=False, max_sequence_length=128,
    )  # fmt: skip
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def v(x, t, i):
        out = pipe.transformer(x, embeds[i], pooled[i], timestep=torch.full((x.shape[0],), t)).sample
        assert out.shape == x.shape
        return out

    with torch.no_grad():
        base = v(x, 500.0, [0, 0])
        assert base.std() > 0.3
        assert (base[0] - base[1]).std() > 0.2
        assert (base - v(x, 100.0, [0, 0])).std() > 0.1
        assert (base - v(x, 500.0, [1, 1])).std() > 0.2


def test_lora_target_modules_exist(pipe):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    modules = dict(pipe.transformer.named_modules())
    blocks = len(pipe.transformer.transformer_blocks)
    for i in range(blocks):
        last = i == blocks - 1
        for target in LORA_TARGETS:
            name = f"transformer_blocks.{i}.{target}"
            if last and target == "attn.to_add_out":  # the last block is context_pre_only
                assert name not in modules
            else:
                assert isinstance(modules[name], torch.nn.Linear), name

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS))
    lora = get_peft_model(copy.deepcopy(pipe.transformer), config)
    wrapped = [name for name, module in lora.named_modules() if isinstance(module, LoraLayer)]
    assert len(wrapped) == 8 * blocks - 1


def test_random_sd35m_has_the_real_shapes_end_to_end():
    """builtin:random-sd35m, built on the meta device (no weights): prompts encode to 77 + 128 tokens x 4096 and a
    2048-wide pooled vector, and the SD3.5-M transformer maps a 512 px latent to a velocity of the same shape."""
    pipe = tiny.random_sd35m_pipeline(torch.device("meta"))
    assert pipe.transformer.config.num_layers == 24 and pipe.vae.config.block_out_channels == (128, 256, 512, 512)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=["a red apple"], prompt_2=None, prompt_3=None,
                                              device=torch.device("meta"), do_classifier_free_guidance=False,
                                              max_sequence_length=128)
    assert embeds.shape == (1, 77 + 128, 4096) and pooled.shape == (1, 2048)
    x = torch.empty(1, 16, 64, 64, device="meta")
    v = pipe.transformer(hidden_states=x, timestep=torch.ones(1, device="meta"), encoder_hidden_states=embeds,
                         pooled_projections=pooled, return_dict=False)[0]
    assert v.shape == x.shape
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 2.2e9  # SD3.5-M's MMDiT-X: ~2.5 B parameters
