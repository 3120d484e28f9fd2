"""Images from the base SD3 model plus an optional LoRA checkpoint: the engine of generate.py and metrics.py.

    gen = load_generator("https://huggingface.co/nvidia/finite-difference-flow-optimization/tree/main/"
                         "fdfo-combined-reward-cfg-4.5/epoch-0000100")    # guidance 4.5, from the folder name
    images = gen.generate(["a red bicycle", "a cat"], seeds=[0, 1])      # float32 [2, 3, 512, 512] in [0, 1], CPU
    other = load_generator(None, base=gen.base)                          # the base model, same pipeline in memory

Image i starts from `torch.randn(latent, generator=torch.Generator(device).manual_seed(seeds[i]))` and is sampled
with plain Euler steps over the model's sigmas (ALGORITHM.md §1, no churn), with CFG against the empty prompt when
the scale is not 1 (§2). So an image depends on its prompt and seed only, not on the batch it shares or the number
of GPUs (up to the rounding of batched kernels). The model runs in bf16 on CUDA and fp32 on CPU.

The adapter is loaded through PEFT (rank, alpha and targets from its adapter_config.json) and merged into the
transformer weights, so sampling costs what the base model costs. One `BaseModel` (pipeline) can serve several
generators: each merges its adapter on use, after restoring the base weights it saved before the first merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fdfo import distributed as dist
from fdfo.config import SD35_MEDIUM
from fdfo.hub import Checkpoint, resolve_checkpoint
from fdfo.sampling import sample_euler
from fdfo.sd3 import SD3Policy


def resolve_guidance(checkpoint_scale: float | None, requested: float | None, checkpoint: str = "the checkpoint"
                     ) -> float:
    """The CFG scale to sample with: `requested` if given, else the checkpoint's (recorded or inferred), else 1.

    A checkpoint trained with CFG must be sampled with the same scale (ALGORITHM.md §9): overriding it warns.
    """
    if requested is None:
        return 1.0 if checkpoint_scale is None else float(checkpoint_scale)
    if checkpoint_scale is not None and float(requested) != float(checkpoint_scale):
        dist.warn0(f"{checkpoint} was trained with guidance scale {checkpoint_scale:g}; sampling it at {requested:g} as "
             f"requested gives images it was not optimised for")
    return float(requested)


# ----------------------------------------------------------------------------------------------------------------------
# Adapters


@dataclass
class Adapter:
    """A PEFT LoRA read from disk: its config and tensors (CPU), checked against the base model when merged."""

    checkpoint: Checkpoint
    config: object  # peft.LoraConfig
    state: dict[str, torch.Tensor]


def read_adapter(checkpoint: Checkpoint) -> Adapter:
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = checkpoint.adapter_dir
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint.description}: adapter_config.json is damaged ({e})") from None
    kind = raw.get("peft_type", "LORA") if isinstance(raw, dict) else type(raw).__name__
    if kind != "LORA":
        raise ValueError(f"checkpoint {checkpoint.description}: only LoRA adapters are supported, its "
                         f"adapter_config.json holds {kind}")
    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
    except Exception as e:  # peft / safetensors raise assorted types for a damaged file
        raise ValueError(f"checkpoint {checkpoint.description}: cannot read the adapter "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    config.inference_mode = True
    return Adapter(checkpoint, config, state)


def _strip_lora(transformer: torch.nn.Module) -> None:
    """Undo a half-done PEFT injection: put every wrapped layer's base layer back, drop the attached config."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child,
                    module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config


class BaseModel:
    """The SD3 pipeline, loaded once per process, with at most one adapter merged into its transformer."""

    def __init__(self, pretrained_model: str, device: torch.device):
        self.pretrained_model = pretrained_model
        self.policy = SD3Policy(pretrained_model, device, lora_rank=None)
        self.device = self.policy.device
        self._originals: dict[str, dict[str, torch.Tensor]] = {}  # module name -> base weight / bias, on CPU
        self._active: Adapter | None = None

    def activate(self, adapter: Adapter | None) -> None:
        """Make the transformer the base model plus `adapter` (None: the base model itself)."""
        if adapter is self._active:
            return
        self._restore()
        if adapter is not None:
            self._merge(adapter)
        self._active = adapter

    def _restore(self) -> None:
        transformer = self.policy.transformer
        with torch.no_grad():
            for name, tensors in self._originals.items():
                module = transformer.get_submodule(name)
                for key, value in tensors.items():
                    getattr(module, key).copy_(value)
        self._active = None

    def _merge(self, adapter: Adapter) -> None:
        import copy

        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        transformer, state = self.policy.transformer, adapter.state
        misfit = f"adapter {adapter.checkpoint.description} does not fit the base model {self.pretrained_model}"
        try:
            model = get_peft_model(transformer, copy.deepcopy(adapter.config))
        except (ValueError, RuntimeError, KeyError, TypeError) as e:  # e.g. target modules the model does not have
            _strip_lora(transformer)
            raise ValueError(f"{misfit}: {' '.join(str(e).split())[:400]}") from None
        # Check every tensor before copying, so a misfit is a short message instead of torch's list of mismatches.
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        wrong = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        problem = None
        if wrong:
            problem = (f"{len(wrong)} of its {len(state)} tensors have another shape than the model's layers, e.g. "
                       f"{wrong[0]}: {list(state[wrong[0]].shape)} in the adapter, {list(expected[wrong[0]])} in the "
                       f"model (an adapter for another model?)")
        elif missing or unexpected:
            problem = (f"{len(missing)} LoRA tensors missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                       f"(e.g. {unexpected[:1]})")
        else:
            set_peft_model_state_dict(model, state)
        if problem:
            _strip_lora(transformer)
            raise ValueError(f"{misfit}: {problem}")
        for name, module in transformer.named_modules():
            if isinstance(module, LoraLayer) and name not in self._originals:
                base = module.get_base_layer()
                self._originals[name] = {key: getattr(base, key).detach().to("cpu", copy=True)
                                         for key in ("weight", "bias") if getattr(base, key, None) is not None}
        model.merge_and_unload()  # W <- W + (alpha / r) B A in every wrapped layer; the wrappers are removed


# ----------------------------------------------------------------------------------------------------------------------
# Generators


class Generator:
    """Base model + one checkpoint + sampling settings. `generate(prompts, seeds)` -> float32 `[B, 3, H, W]`."""

    def __init__(self, base: BaseModel, checkpoint: Checkpoint, adapter: Adapter | None, guidance_scale: float,
                 num_steps: int, resolution: int):
        self.base, self.checkpoint, self.adapter = base, checkpoint, adapter
        self.guidance_scale, self.num_steps, self.resolution = guidance_scale, num_steps, resolution
        self.checkpoint_description = checkpoint.description
        self.label = checkpoint.label
        self.latent_shape = base.policy.latent_shape(resolution)
        self.sigmas = base.policy.sigmas(num_steps)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """`[B, C, h, w]`: image i's noise comes from its own generator seeded with seeds[i], nothing else."""
        return torch.stack([torch.randn(self.latent_shape, device=self.device,
                                        generator=torch.Generator(self.device).manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], batch_size: int | None = None) -> torch.Tensor:
        """Images for `prompts[i]` from `seeds[i]`: float32 `[B, 3, H, W]` in [0, 1] on CPU.

        batch_size: images per forward pass (default: all at once); it does not change the images.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per image")
        if not prompts:
            return torch.zeros(0, 3, self.resolution, self.resolution)
        self.base.activate(self.adapter)
        policy = self.base.policy
        policy.guidance_scale = self.guidance_scale  # the policy is shared between generators
        step = batch_size or len(prompts)
        images = []
        for i in range(0, len(prompts), step):
            x = self.initial_noise(seeds[i:i + step])
            latents = sample_euler(policy.velocity, x, policy.encode(list(prompts[i:i + step])), self.sigmas)
            images.append(policy.decode(latents).float().cpu())
        return torch.cat(images)


def load_generator(checkpoint: str | Checkpoint | None, pretrained_model: str | None = None,
                   device: torch.device | None = None, guidance_scale: float | None = None, num_steps: int = 40,
                   resolution: int = 512, base: BaseModel | None = None) -> Generator:
    """Resolve `checkpoint` (any form of fdfo.hub, or a resolved Checkpoint; None = the base model), load the base
    model (or reuse `base`), merge the adapter, and fix the guidance scale (default: the checkpoint's, see
    `resolve_guidance`).

    pretrained_model: default the model recorded in our checkpoint's state.json, else SD3.5 Medium.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)
    recorded = ckpt.pretrained_model
    if pretrained_model is None:
        pretrained_model = base.pretrained_model if base is not None else recorded or SD35_MEDIUM
    if recorded is not None and recorded != pretrained_model:
        dist.warn0(f"{ckpt.description} was trained on {recorded}, but the base model is {pretrained_model}")
    adapter = read_adapter(ckpt) if ckpt.adapter_dir is not None else None
    scale = resolve_guidance(ckpt.guidance_scale, guidance_scale, ckpt.description)
    if base is None:
        base = BaseModel(pretrained_model, device or dist.init())
    elif base.pretrained_model != pretrained_model:
        raise ValueError(f"the shared base model is {base.pretrained_model}, not {pretrained_model}")
    factor = base.policy.pipe.vae_scale_factor * base.policy.pipe.transformer.config.patch_size
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {factor}")
    base.activate(adapter)  # merge now, so an adapter that does not fit fails before any sampling
    return Generator(base, ckpt, adapter, scale, num_steps, resolution)


def describe(gen: Generator) -> str:
    """One line for logs: checkpoint, base model, guidance scale and where it came from."""
    source = ""
    if gen.checkpoint.guidance_scale is not None and gen.guidance_scale == gen.checkpoint.guidance_scale:
        source = f" (from the checkpoint's {gen.checkpoint.guidance_source})"
    return (f"{gen.checkpoint_description} on {gen.base.pretrained_model}: guidance scale {gen.guidance_scale:g}"
            f"{source}, {gen.num_steps} Euler steps, {gen.resolution} px")


__all__ = ["Adapter", "BaseModel", "Generator", "describe", "load_generator", "read_adapter", "resolve_guidance"]
