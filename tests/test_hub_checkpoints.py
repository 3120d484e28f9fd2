"""Checkpoint resolution (fdfo/hub.py): every --checkpoint form, the guidance scale a checkpoint implies, what gets
downloaded, and one clear error per bad input. Hub lookups run in-process against the fake cache of tests/fake_hub.py
by pointing huggingface_hub's constants at it (the end-to-end tests in test_generate.py use the environment)."""

import json

import pytest
from huggingface_hub import constants

from fdfo.hub import HubRef, infer_guidance_scale, parse_hub_ref, resolve_checkpoint
from tests.fake_hub import (
    CFG_45,
    DECOY,
    FDFO_REPO,
    NFT_REPO,
    NO_CFG,
    build_checkpoint_cache,
    make_adapter,
    tiny_transformer,
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_checkpoint_cache(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.mark.parametrize("spec, ref", [
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/{NO_CFG}", HubRef(FDFO_REPO, NO_CFG)),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/{NO_CFG}/", HubRef(FDFO_REPO, NO_CFG)),
    (f"huggingface.co/{FDFO_REPO}/tree/v1.0/{CFG_45}?not=used#x", HubRef(FDFO_REPO, CFG_45, "v1.0")),
    (f"https://huggingface.co/{FDFO_REPO}/blob/main/{CFG_45}/adapter_config.json", HubRef(FDFO_REPO, CFG_45)),
    (f"https://hf.co/{FDFO_REPO}/resolve/abc123/{NO_CFG}/adapter_model.safetensors",
     HubRef(FDFO_REPO, NO_CFG, "abc123")),
    (f"https://huggingface.co/{NFT_REPO}", HubRef(NFT_REPO)),
    (f"https://huggingface.co/{NFT_REPO}/tree/main", HubRef(NFT_REPO)),
    (f"hf:{NFT_REPO}", HubRef(NFT_REPO)),
    (f"hf:{FDFO_REPO}/{CFG_45}", HubRef(FDFO_REPO, CFG_45)),
    (f"hf:{FDFO_REPO}@refs%2Fpr%2F3/{CFG_45}", HubRef(FDFO_REPO, CFG_45, "refs/pr/3")),
    ("runs/00001-fdfo/checkpoints/epoch-0000005", None),
    ("./adapter", None),
])
def test_parse_hub_ref(spec, ref):
    assert parse_hub_ref(spec) == ref


@pytest.mark.parametrize("spec, fragment", [
    ("https://huggingface.co/nvidia", "names no repository"),
    (f"https://huggingface.co/{FDFO_REPO}/commits/main", "expected /tree/REVISION/FOLDER"),
    (f"https://huggingface.co/{FDFO_REPO}/tree", "expected /tree/REVISION/FOLDER"),
    (f"https://huggingface.co/{FDFO_REPO}/blob/main/{NO_CFG}/README.md", "is the address of a file"),
    ("https://huggingface.co/datasets/zhwang/HPDv2", "points to a dataset"),
    ("https://github.com/NVlabs/DiffusionNFT", "is not a Hugging Face address"),
    ("hf:nvidia", "names no repository"),
    ("hf:nvidia/bad name!", "is not a valid repository id"),
    (f"hf:{FDFO_REPO}/../secrets", "'.' and '..', separators"),
])
def test_malformed_addresses_are_value_errors(spec, fragment):
    with pytest.raises(ValueError, match="checkpoint") as e:
        resolve_checkpoint(spec)
    assert fragment in str(e.value)


def test_guidance_scale_from_published_folder_names():
    assert infer_guidance_scale(f"finite-difference-flow-optimization/{NO_CFG}") == 1.0
    assert infer_guidance_scale("fdfo-combined-reward-cfg-2.0/epoch-0000100") == 2.0
    assert infer_guidance_scale(f"finite-difference-flow-optimization/{CFG_45}") == 4.5
    assert infer_guidance_scale("/data/fdfo-combined-reward-cfg-4.5/epoch-0000100/") == 4.5
    assert infer_guidance_scale("SD3.5M-DiffusionNFT-MultiReward") is None
    assert infer_guidance_scale("runs/00001-cfgsweep/checkpoints/epoch-0000005") is None


def test_every_hub_form_resolves_offline_to_its_folder(offline):
    snapshot = next((offline["cache"] / f"models--{FDFO_REPO.replace('/', '--')}" / "snapshots").iterdir())
    for key, folder, scale in (("no_cfg", NO_CFG, 1.0), ("cfg_4.5", CFG_45, 4.5)):
        for spec in (offline["adapters"][key]["url"], offline["adapters"][key]["hf"]):
            ckpt = resolve_checkpoint(spec)
            assert ckpt.adapter_dir == snapshot / folder
            assert (ckpt.guidance_scale, ckpt.guidance_source) == (scale, "folder name")
            assert ckpt.description == f"hf:{FDFO_REPO}/{folder}" and ckpt.label == folder
    nft = resolve_checkpoint(offline["adapters"]["nft"]["url"])
    assert (nft.adapter_dir / "adapter_config.json").is_file() and nft.guidance_scale == 1.0  # a known repository
    assert resolve_checkpoint(None).adapter_dir is None and resolve_checkpoint("base").adapter_dir is None


def test_missing_things_are_clear_file_not_found_errors(offline):
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint(f"hf:{FDFO_REPO}/fdfo-combined-reward-no-cfg/epoch-0000099")
    assert "fdfo-combined-reward-no-cfg/epoch-0000099" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
    assert f"hf download {FDFO_REPO}" in str(e.value)
    with pytest.raises(FileNotFoundError, match="adapter_config.json") as e:
        resolve_checkpoint(f"https://huggingface.co/{FDFO_REPO}")  # the root holds only a README
    with pytest.raises(FileNotFoundError, match="nvidia/no-such-repo.*not in the Hugging Face cache"):
        resolve_checkpoint("https://huggingface.co/nvidia/no-such-repo/tree/main/x")
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        resolve_checkpoint(f"hf:{FDFO_REPO}@v9/{NO_CFG}")
    with pytest.raises(FileNotFoundError, match=f"write hf:{NFT_REPO}"):
        resolve_checkpoint(NFT_REPO)  # a bare repo id is a relative path that does not exist: suggest the hub forms


def test_only_the_requested_folder_is_fetched(hub, monkeypatch):
    """Online: snapshot_download is asked for the folder's adapter files (and state.json) only."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        return str(next((hub["cache"] / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_checkpoint(f"https://huggingface.co/{FDFO_REPO}/tree/main/{CFG_45}")
    resolve_checkpoint(f"https://huggingface.co/{NFT_REPO}")
    assert calls == [
        (FDFO_REPO, None, [f"{CFG_45}/adapter_config.json", f"{CFG_45}/adapter_model.safetensors",
                           f"{CFG_45}/pytorch_lora_weights.safetensors", f"{CFG_45}/state.json"]),
        (NFT_REPO, None, ["adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors",
                          "state.json"]),
    ]


def test_the_decoy_folder_is_poison(offline):
    """The damaged sibling folder fails loudly when it is read, so tests that never touch it prove something."""
    from fdfo.generation import read_adapter

    ckpt = resolve_checkpoint(f"hf:{FDFO_REPO}/{DECOY}")
    with pytest.raises(ValueError, match="adapter_config.json is damaged"):
        read_adapter(ckpt)


def test_local_forms_and_state_json(tmp_path):
    transformer = tiny_transformer()
    run = tmp_path / "runs" / "00003-sweep"
    for epoch, scale in ((2, 3.0), (10, 2.5)):
        folder = run / "checkpoints" / f"epoch-{epoch:07d}"
        make_adapter(folder, transformer, rank=2, alpha=4, seed=epoch)
        (folder / "state.json").write_text(json.dumps({"epoch": epoch, "guidance_scale": scale,
                                                       "pretrained_model": "builtin:tiny-sd3"}))
    newest = run / "checkpoints" / "epoch-0000010"
    for spec in (run, run / "checkpoints", newest, newest / "adapter_model.safetensors"):
        ckpt = resolve_checkpoint(str(spec))
        assert ckpt.adapter_dir == newest
        assert (ckpt.guidance_scale, ckpt.guidance_source, ckpt.pretrained_model) == (2.5, "state.json",
                                                                                      "builtin:tiny-sd3")
    older = resolve_checkpoint(str(run / "checkpoints" / "epoch-0000002"))
    assert older.guidance_scale == 3.0 and older.label == "00003-sweep/epoch-0000002"

    plain = tmp_path / "fdfo-combined-reward-cfg-2.0" / "epoch-0000100"  # a downloaded published folder
    make_adapter(plain, transformer, rank=2, alpha=4, seed=0)
    assert resolve_checkpoint(str(plain)).guidance_scale == 2.0

    (tmp_path / "runs" / "00004-empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        resolve_checkpoint(str(tmp_path / "runs" / "00004-empty"))
    (newest / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        resolve_checkpoint(str(newest))
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        resolve_checkpoint(str(tmp_path))


KNOWN = {"jieliu/SD3.5M-FlowGRPO-GenEval": 4.5, "jieliu/SD3.5M-FlowGRPO-PickScore": 4.5,
         "jieliu/SD3.5M-FlowGRPO-Text": 4.5, "worstcoder/SD3.5M-DiffusionNFT-MultiReward": 1.0}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """A fake cache with the public baselines (a tiny adapter at each root), an unknown repository, and a repository
    holding only a diffusers-format LoRA."""
    import shutil

    from safetensors.torch import save_file

    from tests.tiny_rewards import build_fake_hf_cache

    source = tmp_path_factory.mktemp("adapter")
    state = make_adapter(source, tiny_transformer(), rank=2, alpha=2, seed=0)

    def copy(folder):
        shutil.copytree(source, folder)

    def diffusers(folder):
        folder.mkdir(parents=True)
        save_file({k.replace("base_model.model.", "transformer."): v for k, v in state.items()},
                  str(folder / "pytorch_lora_weights.safetensors"))

    repos = {**{repo: copy for repo in KNOWN}, "someone/SD3.5M-FlowGRPO-Copy": copy,
             "someone/diffusers-lora": diffusers}
    return build_fake_hf_cache(tmp_path_factory.mktemp("baselines"), repos)


@pytest.mark.parametrize("repo", sorted(KNOWN))
def test_known_public_ids_default_to_their_guidance(baselines, monkeypatch, repo):
    """Flow-GRPO: 4.5, DiffusionNFT: 1.0 (docs/algorithm.md §9), by URL and hf: form, any capitalisation; an unknown
    repository says nothing; a state.json would still take precedence (tested with our runs)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(baselines))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec in (f"https://huggingface.co/{repo}", f"hf:{repo}", f"https://huggingface.co/{repo}/tree/main"):
        ckpt = resolve_checkpoint(spec)
        assert ckpt.guidance_scale == KNOWN[repo], spec
        assert ckpt.guidance_source == f"repository ({repo} is known to use it)"
    assert resolve_checkpoint("hf:someone/SD3.5M-FlowGRPO-Copy").guidance_scale is None


def test_known_ids_choose_the_guidance_and_say_why(baselines, monkeypatch, capsys):
    from fdfo.generation import BaseModel, describe, load_generator

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(baselines))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import torch

    from fdfo.models import tiny_sd3 as tiny

    base = BaseModel(str(tiny.tiny_sd3_path()), torch.device("cpu"))
    kwargs = {"base": base, "num_steps": 1, "resolution": 64}
    grpo = load_generator("hf:jieliu/SD3.5M-FlowGRPO-Text", **kwargs)
    assert grpo.guidance_scale == 4.5
    assert "guidance scale 4.5 (from the checkpoint's repository (jieliu/SD3.5M-FlowGRPO-Text is known to use it))" \
        in describe(grpo)
    unknown = load_generator("hf:someone/SD3.5M-FlowGRPO-Copy", **kwargs)
    assert unknown.guidance_scale == 1.0
    assert "(the default: the checkpoint records no guidance scale)" in describe(unknown)
    assert not [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    forced = load_generator("hf:jieliu/SD3.5M-FlowGRPO-GenEval", guidance_scale=1.0, **kwargs)
    assert forced.guidance_scale == 1.0 and "(as requested)" in describe(forced)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert "trained with guidance scale 4.5" in line
    diffusers = resolve_checkpoint("https://huggingface.co/someone/diffusers-lora")
    assert (diffusers.adapter_dir / "pytorch_lora_weights.safetensors").is_file()


SEPARATOR, DOTS = "encoded path separators (%2F, %5C) are not allowed", "'.' and '..', separators"


@pytest.mark.parametrize("spec, fragment", [
    (f"hf:{FDFO_REPO}/%2F..%2Fsecrets", SEPARATOR),
    (f"hf:{FDFO_REPO}/..%2F..%2Fsecrets", SEPARATOR),
    (f"hf:{FDFO_REPO}/fdfo%2fx/adapter", SEPARATOR),
    (f"hf:{FDFO_REPO}/%2e%2e/secrets", "'%2e%2e' decodes to '..'"),
    (f"hf:{FDFO_REPO}/%2E%2E%2Fsecrets", SEPARATOR),
    (f"hf:{FDFO_REPO}/x%5C..%5Csecrets", SEPARATOR),
    (f"hf:{FDFO_REPO}/x%252F..", "'x%252F..' decodes to 'x%2F..'"),
    (f"hf:{FDFO_REPO}@..%2F..%2Fsecrets/{NO_CFG}", "'..%2F..%2Fsecrets' decodes to '../../secrets'"),
    (f"hf:{FDFO_REPO}@main%5Cx/{NO_CFG}", SEPARATOR),
    ("hf:nvidia%2F..%2Fx/repo", SEPARATOR),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/%2F..%2Fsecrets", SEPARATOR),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/..%2Fsecrets", SEPARATOR),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/%2e%2e/%2e%2e/secrets", "'%2e%2e' decodes to '..'"),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/x%5Csecrets", SEPARATOR),
    (f"https://huggingface.co/{FDFO_REPO}/tree/refs%2F..%2F..%2Fx/{NO_CFG}", "decodes to 'refs/../../x'"),
    (f"https://huggingface.co/{FDFO_REPO}/tree/main/fdfo%2Fx/adapter", SEPARATOR),
    ("https://huggingface.co/nvidia/%2e%2e/tree/main/x", "'%2e%2e' decodes to '..'"),
    (f"hf:{FDFO_REPO}/../secrets", DOTS),
])
def test_encoded_escapes_from_the_cache_are_refused(spec, fragment, monkeypatch):
    """Percent-encoded `..` and separators are decoded before the check (or refused outright), so no address can
    name a path outside the Hugging Face cache; nothing is looked up."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("snapshot_download was called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    with pytest.raises(ValueError, match="not allowed in a hub path") as e:
        resolve_checkpoint(spec)
    assert fragment in str(e.value)
