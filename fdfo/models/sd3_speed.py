"""Bit-identical speed levers of the SD3 LoRA policy, on by default (docs/performance.md "Kernel census").

Each removes kernels that autocast or PEFT launch without changing a single number (tests/test_sd3_speed.py compares
velocities, ratios and every LoRA gradient with torch.equal, fp16 and bf16):
- `base_dtype`: the frozen Linear / Conv2d weights and biases stored in the autocast dtype. Autocast casts them to
  that dtype on every call (`w.to(dtype)`, kept for the backward too); the stored copy is the same tensor. Not the
  norms' weights (their dtype decides a rounding outside autocast) and no buffer (`pos_embed`).
- `peft_cast`: PEFT's cast of a LoRA input to the adapter's fp32 off: under autocast, x16 -> fp32 -> x16 is exact,
  and autocast casts the input of lora_A itself.
- `lora_cache`: without autograd (sampling), the LoRA weights' casts to the autocast dtype are kept and reused while
  the weights do not change: a cast is remade when its weight's version counter or storage differs, dropped by any
  forward with autograd (an optimizer step always follows one) and by `SD3Policy.load_adapter`.
- `shared_cast`: an activation that several projections of one attention read (q, k, v and their LoRA A; the base
  and the LoRA A of an output projection) is cast once; each consumer gets a view of that cast through its own
  autograd node, whose backward casts the consumer's gradient back as autocast's own cast node does, so the
  gradients are summed in the input's dtype in the same order as before.
With an autocast dtype they make the transformer a module for that autocast (SD3Policy.velocity, and a gradient
checkpoint's recomputation, run it so); the policy without autocast (fp32 on a CPU) gets none of them. Code that
torch.compile traces (--train.compile) runs without lora_cache and shared_cast: the compiler fuses casts itself.
"""

from __future__ import annotations

import dataclasses

import torch

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out.0")


@dataclasses.dataclass(frozen=True)
class SpeedLevers:
    """Which levers are on (all by default)."""

    base_dtype: bool = True
    peft_cast: bool = True
    lora_cache: bool = True
    shared_cast: bool = True

    @classmethod
    def parse(cls, text: str) -> SpeedLevers:
        """"all", "none", or a comma-separated list of the levers to turn on (the others off); ValueError naming the
        allowed names."""
        names = [f.name for f in dataclasses.fields(cls)]
        if text in ("all", "none"):
            return cls(**{n: text == "all" for n in names})
        chosen = [part.strip().replace("-", "_") for part in text.split(",") if part.strip()]
        unknown = [c for c in chosen if c not in names]
        if unknown or not chosen:
            raise ValueError(f"--levers {text!r}: give all, none, or a comma-separated list of "
                             f"{', '.join(n.replace('_', '-') for n in names)}")
        return cls(**{n: n in chosen for n in names})

    def names(self) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(self) if getattr(self, f.name)]


class SharedCast(torch.autograd.Function):
    """One consumer's view of `cast` (= x cast once, made without autograd); backward: the consumer's gradient cast
    to x's dtype, what the backward of autocast's own cast of x would give this consumer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        ctx.set_materialize_grads(False)  # a consumer without a gradient gives none, as autocast's cast node would
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return (None if grad is None else grad.to(ctx.dtype)), None


def _lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _frozen_projections(model: torch.nn.Module, lora_parts: set[int]):
    """Linear and Conv2d modules of the frozen base (not PEFT's lora_A / lora_B)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and id(module) not in lora_parts:
            yield module


class LeverRuntime:
    """The levers installed on one transformer (module docstring)."""

    def __init__(self, model: torch.nn.Module, amp_dtype: torch.dtype | None, levers: SpeedLevers):
        self.levers, self.amp_dtype = levers, amp_dtype
        self.memo: dict | None = None  # the shared casts of one attention call: id(x) -> (x, cast)
        self.lora = _lora_layers(model)
        if amp_dtype is None:
            return
        lora_parts = {id(m) for layer in self.lora for d in (layer.lora_A, layer.lora_B) for m in d.values()}
        if levers.base_dtype:
            self._store_base_in(amp_dtype, model, lora_parts)
        for layer in self.lora if levers.peft_cast else ():
            layer.cast_input_dtype_enabled = False
        for part in self._lora_parts() if levers.lora_cache else ():
            if type(part) is torch.nn.Linear and part.bias is None:
                part.__class__ = CastOnceLinear
                part.__dict__["_fdfo_levers"] = self
        if levers.shared_cast:
            self._install_shared_casts(model)

    def _lora_parts(self):
        for layer in self.lora:
            yield from (*layer.lora_A.values(), *layer.lora_B.values())

    @staticmethod
    def _store_base_in(dtype: torch.dtype, model: torch.nn.Module, lora_parts: set[int]) -> None:
        for module in _frozen_projections(model, lora_parts):
            for p in (module.weight, module.bias):
                if p is not None and p.is_floating_point() and p.dtype != dtype and not p.requires_grad:
                    p.data = p.data.to(dtype)

    # -- lora_cache ------------------------------------------------------------------------------------------------

    def drop_casts(self) -> None:
        for part in self._lora_parts():
            part.__dict__.pop("_fdfo_cast", None)

    def kept_cast(self, module: torch.nn.Module) -> torch.Tensor | None:
        """Without autograd: the cast of `module.weight` kept from an earlier call while the weight is unchanged (made
        now if not). With autograd: None (autocast casts the weight, and its gradient needs that), and the kept cast
        is dropped (the weight is about to change)."""
        weight = module.weight
        if torch.compiler.is_compiling():
            return None  # compiled code fuses the casts itself
        if torch.is_grad_enabled():
            module.__dict__.pop("_fdfo_cast", None)
            return None
        if weight.dtype == self.amp_dtype:
            return None
        key = (weight._version, weight.untyped_storage()._cdata, weight.storage_offset(), self.amp_dtype)
        kept = module.__dict__.get("_fdfo_cast")
        if kept is None or kept[0] != key:
            kept = (key, weight.detach().to(self.amp_dtype))
            module.__dict__["_fdfo_cast"] = kept
        return kept[1]

    # -- shared_cast -------------------------------------------------------------------------------------------------

    def _install_shared_casts(self, model: torch.nn.Module) -> None:
        from diffusers.models.attention_processor import Attention
        from peft.tuners.lora import LoraLayer

        for attention in (m for m in model.modules() if isinstance(m, Attention)):
            attention.register_forward_pre_hook(self._open_memo)
            attention.register_forward_hook(self._close_memo)
            for name in ATTENTION_PROJECTIONS:
                projection = _get(attention, name)
                if projection is None:
                    continue
                consumers = [projection]
                if isinstance(projection, LoraLayer):
                    consumers = [projection.base_layer, *projection.lora_A.values()]
                for consumer in consumers:
                    consumer.register_forward_pre_hook(self._share_input)

    def _open_memo(self, module, args):
        self.memo = None if torch.compiler.is_compiling() else {}  # compiled code fuses the casts itself

    def _close_memo(self, module, args, output):
        self.memo = None

    def _share_input(self, module, args):
        x = args[0] if args else None
        if self.memo is None or torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) \
                or not x.is_floating_point() or x.dtype == self.amp_dtype:
            return None
        kept = self.memo.get(id(x))
        if kept is None:
            with torch.no_grad():
                kept = (x, x.to(self.amp_dtype))
            self.memo[id(x)] = kept  # x stays alive with it, so its id is not reused within the call
        shared = SharedCast.apply(x, kept[1]) if torch.is_grad_enabled() and x.requires_grad else kept[1]
        return (shared, *args[1:])


class CastOnceLinear(torch.nn.Linear):
    """PEFT's lora_A / lora_B (bias-free Linear) with the lora_cache lever: the same parameters and state dict, the
    weight's kept cast while sampling (`LeverRuntime.kept_cast`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levers = self.__dict__.get("_fdfo_levers")
        kept = levers.kept_cast(self) if levers is not None else None
        return torch.nn.functional.linear(x, self.weight if kept is None else kept)


def _get(module: torch.nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
