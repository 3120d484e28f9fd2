"""--reward.overlap-preprocessing: the reward scorers' stage / prepare / score split (rewards/) and its use by
sample_phase (fdfo/scoring.py), where one worker thread prepares batch i while the main thread samples batch i+1."""

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fdfo.config import batch_geometry
from fdfo.models.sd3 import SD3Policy
from fdfo.phases import sample_phase
from fdfo.resume import check_resume_settings, resolved_config
from fdfo.scoring import batch_scorer, to_host
from rewards import Term, WeightedReward
from rewards.analytic import Redness
from rewards.clip import CLIPScorer
from rewards.vlm import ALIGNMENT_QUESTION, VLMScorer
from rewards.weighted import RewardTermError
from tests.test_train import tiny_config
from tests.tiny_rewards import save_tiny_clip, save_tiny_qwen_vl

PROMPTS = ["a photo of a cat", "a red car parked at night " * 20, "x", "", "an oil painting of a boat"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    model, processor = save_tiny_clip(root / "model", seed=1), save_tiny_clip(root / "processor", seed=2)
    return CLIPScorer.load(str(model), str(processor), device="cpu", chunk_size=2, model_option="pickscore_model",
                           processor_option="pickscore_processor", what="PickScore")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "model", seed=5)
    return VLMScorer.load(str(folder), device="cpu", chunk_size=2, question=ALIGNMENT_QUESTION)


def workers():
    """Live reward-preparation threads (counted by name: tqdm starts a monitor thread of its own on first use)."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("reward-prepare")]


def images(batch=5, seed=0):
    return torch.rand(batch, 3, 64, 48, generator=torch.Generator().manual_seed(seed))


def in_worker(fn, *args):
    """`fn(*args)` in a fresh worker thread, as sample_phase runs `prepare` (grad mode etc. are per thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


@pytest.mark.parametrize("kind", ["clip", "vlm_training", "vlm_metric"])
def test_split_in_a_worker_thread_is_the_call_bit_for_bit(clip, vlm, kind):
    scorer = {"clip": clip, "vlm_training": vlm, "vlm_metric": vlm.with_question(ALIGNMENT_QUESTION, True)}[kind]
    x = images()
    host = scorer.stage(x).clone()  # what sample_phase hands the worker: a host copy of the staged images
    inputs = in_worker(scorer.prepare, PROMPTS, host)
    assert len(inputs) == 3  # chunks of 2, 2, 1
    split = scorer.score(inputs)
    assert torch.equal(split, scorer(PROMPTS, x))
    # one call per image (other padding and matmul shapes, so only close: 1.5e-5 apart on the tiny CLIP with the
    # packages installed on 2026-12-04, above assert_close's float32 default of 1e-5; the scores of different prompts
    # are >= 0.45 apart): the split path keeps images and prompts together
    torch.testing.assert_close(split, torch.cat([scorer([p], x[i:i + 1]) for i, p in enumerate(PROMPTS)]),
                               atol=1e-4, rtol=1e-5)
    assert split.unique().numel() == len(PROMPTS)


def test_the_vlm_stage_is_the_resize_of_each_path(vlm):
    x = images(2)
    assert vlm.stage(x).shape == (2, 3, 504, 504) and vlm.stage(x).dtype == torch.float32
    metric = vlm.with_question(ALIGNMENT_QUESTION, True).stage(x)
    assert metric.dtype == torch.uint8 and torch.equal(metric, (x * 255 + 0.5).clamp(0, 255).to(torch.uint8))


def test_weighted_reward_split_is_components(clip, vlm):
    reward = WeightedReward([Term("pickscore", 1.0, clip), Term("vlm_alignment", 0.1, vlm),
                             Term("redness", 2.0, Redness())], "cpu")
    x = images()
    staged = reward.stage(PROMPTS, x)
    assert set(staged) == {"pickscore", "vlm_alignment"}  # the analytic term has nothing to prepare on the host
    prepared = in_worker(reward.prepare_components, PROMPTS, {k: v.clone() for k, v in staged.items()}, x)
    split = reward.score_components(prepared, x.device)
    whole = reward.components(PROMPTS, x)
    assert split.keys() == whole.keys() == {"pickscore", "vlm_alignment", "redness", "reward"}
    assert all(torch.equal(split[k], whole[k]) for k in whole)
    assert torch.equal(split["pickscore"], clip(PROMPTS, x)) and torch.equal(split["vlm_alignment"], vlm(PROMPTS, x))
    assert torch.equal(split["redness"], Redness()(PROMPTS, x))
    torch.testing.assert_close(split["reward"], clip(PROMPTS, x) + 0.1 * vlm(PROMPTS, x) + 2 * Redness()(PROMPTS, x))


# --- sample_phase ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = tiny_config("unused")
    return SD3Policy(cfg.pretrained_model, torch.device("cpu"), cfg.lora_rank, cfg.lora_alpha)


def _overlap_cfg(tmp_path, overlap):
    cfg = tiny_config(tmp_path)  # 4 pairs, 3 solver steps, 64 px
    cfg.sample.batch_size = 1  # 4 sampling batches: batch i+1 is sampled while batch i is prepared
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, overlap_preprocessing=overlap))


class _Recorder:
    """The order of the device work of sample_phase (S: a sampling step, D: a decode, R: a reward forward; repeats
    merged) and the threads that ran the CLIP forwards and its image processor."""

    def __init__(self, monkeypatch, policy, scorer: CLIPScorer):
        self.events, self.forward, self.processor = [], set(), set()
        for name, event in (("velocity", "S"), ("decode", "D")):
            monkeypatch.setattr(policy, name, self._wrap(getattr(policy, name), event))
        self.hook = scorer.model.vision_model.register_forward_pre_hook(lambda *_: self._forward())
        processor = type(scorer.processor.image_processor)
        monkeypatch.setattr(processor, "__call__", self._wrap(processor.__call__, None))

    def _wrap(self, fn, event):
        def wrapped(*args, **kwargs):
            if event is None:
                self.processor.add(threading.get_ident())
            elif self.events[-1:] != [event]:
                self.events.append(event)
            return fn(*args, **kwargs)

        return wrapped

    def _forward(self):
        self.forward.add(threading.get_ident())
        if self.events[-1:] != ["R"]:
            self.events.append("R")


def test_sample_phase_with_overlap_is_the_same_epoch(tmp_path, monkeypatch, policy, clip):
    reward = WeightedReward([Term("pickscore", 1.0, clip), Term("redness", 10.0, Redness())], "cpu")
    prompts = ["a red apple", "a blue boat", "a cat", "a dog"]
    runs, record = {}, {}
    for overlap in (False, True):
        cfg = _overlap_cfg(tmp_path, overlap)
        geom = batch_geometry(cfg, 1)
        assert geom.sample_batch == 1
        with monkeypatch.context() as patch:
            record[overlap] = _Recorder(patch, policy, clip)
            try:
                runs[overlap] = sample_phase(policy, reward, cfg, geom, 0, prompts, 0)
            finally:
                record[overlap].hook.remove()
        assert workers() == []
    off, on = runs[False], runs[True]
    for field in ("states", "velocities", "sigmas", "final", "preview", "timesteps"):
        assert torch.equal(getattr(on, field), getattr(off, field)), field
    assert on.rewards.keys() == off.rewards.keys() == {"pickscore", "redness", "reward"}
    assert all(torch.equal(on.rewards[k], off.rewards[k]) for k in off.rewards)
    assert all(torch.equal(on.cond[k], off.cond[k]) for k in off.cond)
    assert off.rewards["pickscore"].unique().numel() == 8  # every sample its own score: a shifted batch would show
    # off: each batch scored right after its decode; on: batch i scored after batch i+1's sampling, before its decode
    assert "".join(record[False].events) == "SDR" * 4
    assert "".join(record[True].events) == "SD" + "SRD" * 3 + "R"
    main = threading.get_ident()
    assert record[False].forward == record[False].processor == {main}
    assert record[True].forward == {main}  # the model forwards stay in the main thread ...
    assert main not in record[True].processor and len(record[True].processor) == 1  # ... the processor does not


@pytest.mark.parametrize("algorithm", ["flow_grpo", "diffusion_nft"])
def test_baseline_sampling_with_overlap_is_the_same_epoch(tmp_path, monkeypatch, policy, clip, algorithm):
    """The baselines' sample_groups honours the option the same way (one worker; the same rollouts and scores)."""
    from fdfo.algorithms.groups import sample_groups
    from tests.test_algorithms_sd3 import tiny_config as baseline_config

    reward = WeightedReward([Term("pickscore", 1.0, clip), Term("redness", 10.0, Redness())], "cpu")
    runs, record = {}, {}
    for overlap in (False, True):
        cfg = baseline_config(algorithm, tmp_path / "run")
        cfg.sample.batch_size = 1  # 2 sampling batches of one prompt x 4 samples
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, overlap_preprocessing=overlap))
        geom = batch_geometry(cfg, 1)
        with monkeypatch.context() as patch:
            record[overlap] = _Recorder(patch, policy, clip)
            try:
                runs[overlap] = sample_groups(policy, reward, cfg, geom, 0, ["a red apple", "a blue boat"], 0)
            finally:
                record[overlap].hook.remove()
        assert workers() == []
    off, on = runs[False], runs[True]
    assert all(torch.equal(on.items[k], off.items[k]) for k in off.items) and torch.equal(on.final, off.final)
    assert on.rewards.keys() == off.rewards.keys() and all(torch.equal(on.rewards[k], off.rewards[k])
                                                           for k in off.rewards)
    assert off.rewards["pickscore"].unique().numel() == 8
    assert "".join(record[False].events) == "SDR" * 2
    assert "".join(record[True].events) == "SDSRDR"
    assert threading.get_ident() not in record[True].processor


class _Failing:
    """A scorer whose host preparation raises (on the second batch, once a batch is in flight)."""

    def __init__(self):
        self.calls = 0

    def to(self, device):
        return self

    def stage(self, images):
        return images

    def prepare(self, prompts, staged):
        self.calls += 1
        if self.calls == 2:
            raise ZeroDivisionError("prepare failed in the worker")
        return staged

    def score(self, inputs):
        return inputs.mean(dim=(1, 2, 3))


def test_a_worker_exception_surfaces_in_the_main_thread_and_no_thread_is_left(tmp_path, policy):
    cfg = _overlap_cfg(tmp_path, True)
    with pytest.raises(RewardTermError, match="reward term 'bad' raised ZeroDivisionError: prepare failed in the "
                                              "worker") as info:
        sample_phase(policy, WeightedReward([Term("bad", 1.0, _Failing())], "cpu"), cfg, batch_geometry(cfg, 1), 0,
                     ["a", "b", "c", "d"], 0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the original, with its traceback
    assert workers() == []


def test_a_main_thread_exception_with_a_batch_in_flight_shuts_the_worker_down():
    reward = WeightedReward([Term("red", 1.0, Redness())], "cpu")
    before = threading.active_count()
    batch = {}
    with pytest.raises(KeyError):
        with batch_scorer(reward, torch.device("cpu"), overlap=True) as scorer:
            scorer.submit(["a", "b"], images(2), batch)
            assert threading.active_count() == before + 1 and len(workers()) == 1
            raise KeyError("sampling failed")
    assert threading.active_count() == before and "rewards" not in batch


def test_without_the_split_api_the_reward_is_called_at_once():
    class Plain:  # e.g. fdfo.bench.StubReward: only components
        def components(self, prompts, images):
            return {"reward": images.mean(dim=(1, 2, 3))}

    batch, x = {}, images(2)
    with batch_scorer(Plain(), torch.device("cpu"), overlap=True) as scorer:
        scorer.submit(["a", "b"], x, batch)
        assert torch.equal(batch["rewards"]["reward"], x.mean(dim=(1, 2, 3)))


def test_resuming_with_overlap_switched_is_allowed(tmp_path):
    cfg = _overlap_cfg(tmp_path, False)
    geom = batch_geometry(cfg, 1)
    (tmp_path / "config.json").write_text(json.dumps(resolved_config(cfg, geom, None)))
    checkpoint = tmp_path / "checkpoints" / "epoch-0000001"
    on = _overlap_cfg(tmp_path, True)
    assert check_resume_settings(on, geom, checkpoint) == []  # a speed option: nothing refused, nothing to apply
    with pytest.raises(ValueError, match="--seed 1 -> 2"):  # the comparison is live
        check_resume_settings(dataclasses.replace(on, seed=2), geom, checkpoint)


def test_to_host_hands_cpu_tensors_over_without_an_event():
    x = images(2)
    host, ready = to_host({"pickscore": x})
    assert host["pickscore"] is x and ready is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_on_cuda_is_the_same_epoch(tmp_path):
    """The CUDA path: pinned non-blocking copies and the event the worker waits on, with CLIP, the VLM (resized on
    the device) and an analytic term (never copied)."""
    x = images(3).cuda()
    host, ready = to_host({"a": x, "b": x[:, :1].to(torch.uint8)})
    assert host["a"].is_pinned() and ready is not None
    ready.synchronize()
    assert torch.equal(host["a"], x.cpu()) and torch.equal(host["b"], x[:, :1].to(torch.uint8).cpu())
    root = tmp_path / "models"
    model, processor = save_tiny_clip(root / "model", seed=1), save_tiny_clip(root / "processor", seed=2)
    clip = CLIPScorer.load(str(model), str(processor), device="cuda", chunk_size=2, model_option="pickscore_model",
                           processor_option="pickscore_processor", what="PickScore")
    vlm = VLMScorer.load(str(save_tiny_qwen_vl(root / "qwen", seed=5)), device="cuda", chunk_size=2,
                         question=ALIGNMENT_QUESTION)
    reward = WeightedReward([Term("pickscore", 1.0, clip), Term("vlm_alignment", 0.1, vlm),
                             Term("redness", 10.0, Redness())], "cuda")
    torch.manual_seed(0)
    cfg = _overlap_cfg(tmp_path, False)
    policy = SD3Policy(cfg.pretrained_model, torch.device("cuda"), cfg.lora_rank, cfg.lora_alpha)
    prompts = ["a red apple", "a blue boat", "a cat", "a dog"]
    off, on = (sample_phase(policy, reward, _overlap_cfg(tmp_path, overlap), batch_geometry(cfg, 1), 0, prompts, 0)
               for overlap in (False, True))
    for field in ("states", "velocities", "final", "preview"):
        assert torch.equal(getattr(on, field), getattr(off, field)), field
    assert on.rewards.keys() == off.rewards.keys() == {"pickscore", "vlm_alignment", "redness", "reward"}
    assert all(on.rewards[k].is_cuda and torch.equal(on.rewards[k], off.rewards[k]) for k in off.rewards)
    assert workers() == []
