"""Users' own rewards: `plugin:WEIGHT:path/to/file.py:Attr` or `plugin:WEIGHT:my_pkg.rewards:Attr` (docs/rewards.md).

The attribute is a class (built once, with `device=` if its `__init__` takes it), a factory (a callable whose
parameters are all optional, or just `device`: called once) or the reward function itself (`(prompts, images)`). The
built object follows the contract of rewards/common.py; `PluginScorer` moves it with `.to(device)`, calls it under
`torch.no_grad()` in chunks of `--reward.chunk-size` on its own copy of the images (a plug-in that writes into them
changes nothing else) and checks every answer: a float tensor `[b]` on the images' device, within float32's range.
NaN scores pass through (the training loop counts their pairs as invalid), but not at the probe: a reward that scores
neither probe image is refused. A plug-in that calls `sys.exit()` is an error naming it, not the end of the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Sequence

import torch

from fdfo.errors import RunError
from rewards.common import check_batch, chunk_slices

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")  # a log key: "<name>_mean" in log.jsonl, a column of metrics.py
PROBE_SIZE = 64  # side of the two probe images the built object is called on once, before any run folder exists


class PluginAnswerError(RunError, ValueError):
    """A plug-in's answer breaks the contract: one line naming the spec (a ValueError at the probe, before any run
    folder exists; a RunError, which the reward terms pass through as it is, in a run)."""


def failure(err: BaseException) -> str:
    """What an exception raised by a plug-in's own code says, for a message naming the plug-in."""
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r}), which a plug-in must not do"
    return f"{type(err).__name__}: {err}"


def split_target(spec: str, target: str) -> tuple[str, str]:
    """`"path/to/file.py:Attr"` or `"my_pkg.rewards:Attr"` -> (module part, attribute); ValueError if malformed."""
    module, sep, attr = target.rpartition(":")
    if not sep or not module.strip() or not attr.strip().isidentifier():
        raise ValueError(f'Bad reward spec {spec!r}: a plug-in is "plugin:WEIGHT:path/to/file.py:Attr" or '
                         f'"plugin:WEIGHT:my_pkg.rewards:Attr" (a .py file or an importable module, a colon, then the '
                         f"name of a class, factory or function in it).")
    return module.strip(), attr.strip()


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def load_attribute(spec: str, module: str, attr: str) -> object:
    """Import `module` (a .py file or a dotted module name) and return its callable `attr`; ValueError /
    FileNotFoundError naming the spec otherwise. Errors raised by the user's module while importing say so."""
    if _is_file(module):
        path = Path(module).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward plug-in {spec!r}: the file {str(path)!r} does not exist (relative paths "
                                    f"start from the current folder {str(Path.cwd())!r}).")
        if path.suffix != ".py":
            raise ValueError(f"reward plug-in {spec!r}: {str(path)!r} must be a Python file ending in .py (or give "
                             f"an importable module name, my_pkg.rewards:Attr).")
        name = f"fdfo_reward_plugin_{abs(hash(str(path.resolve())))}"
        try:
            loaded = sys.modules.get(name)
            if loaded is None:
                source = importlib.util.spec_from_file_location(name, path)
                loaded = importlib.util.module_from_spec(source)
                sys.modules[name] = loaded  # dataclasses and pickle-free helpers look their module up by name
                try:
                    source.loader.exec_module(loaded)
                except BaseException:
                    del sys.modules[name]
                    raise
        except (Exception, SystemExit) as err:
            raise ValueError(f"reward plug-in {spec!r}: importing {str(path)!r} failed: {failure(err)}") from err
        where = f"the file {str(path)!r}"
    else:
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and module != err.name and not module.startswith(err.name + "."):
                raise ValueError(f"reward plug-in {spec!r}: importing the module {module!r} failed: it needs the "
                                 f"module {err.name!r}, which is not installed") from err
            raise ValueError(f"reward plug-in {spec!r}: no module named {module!r} can be imported (give a .py file "
                             f"path, or install the package / add its folder to PYTHONPATH).") from err
        except (Exception, SystemExit) as err:
            raise ValueError(f"reward plug-in {spec!r}: importing the module {module!r} failed: "
                             f"{failure(err)}") from err
        where = f"the module {module!r}"
    if not hasattr(loaded, attr):
        public = sorted(k for k, v in vars(loaded).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward plug-in {spec!r}: {where} has no attribute {attr!r} (callables in it: "
                         f"{', '.join(public) or 'none'}).")
    target = getattr(loaded, attr)
    if not callable(target):
        raise ValueError(f"reward plug-in {spec!r}: {attr} in {where} is a {type(target).__name__}, not callable; "
                         f"give a class, a factory or a function (prompts, images) -> Tensor[B].")
    return target


def _takes_device(fn) -> bool:
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _is_factory(fn) -> bool:
    """A callable whose parameters are all optional (or keyword `device`) is a factory; anything else is the reward."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.name == "device" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)


def build_plugin(spec: str, target: str, device: torch.device, chunk_size: int) -> PluginScorer:
    """Import, build once, move to `device` and probe the plug-in named by `target`; errors name the spec."""
    module, attr = split_target(spec, target)
    made = load_attribute(spec, module, attr)
    if inspect.isclass(made) or _is_factory(made):
        kwargs = {"device": device} if _takes_device(made.__init__ if inspect.isclass(made) else made) else {}
        try:
            made = made(**kwargs)
        except (Exception, SystemExit) as err:
            raise ValueError(f"reward plug-in {spec!r}: building {attr}({', '.join(kwargs)}) failed: "
                             f"{failure(err)}") from err
        if not callable(made):
            raise ValueError(f"reward plug-in {spec!r}: {attr}() returned a {type(made).__name__}, which is not "
                             f"callable; the reward must be called as reward(prompts, images) -> Tensor[B].")
    name = getattr(made, "name", None)
    name = name if isinstance(name, str) and not callable(name) else attr.lower()
    if not NAME.match(name) or name == "reward":
        raise ValueError(f"reward plug-in {spec!r}: its name {name!r} cannot be a log key: use letters, digits and "
                         f"_ . - (starting with a letter or _), and not 'reward' (the weighted sum).")
    scorer = PluginScorer(made, name, spec, chunk_size).to(device)
    scorer.probe(device)
    return scorer


class PluginScorer:
    """A user's reward behind the scorer interface of rewards/weighted.py: `.to(device)`, no gradients, chunks of
    `chunk_size`, every answer checked (float tensor `[b]` on the images' device), returned as float32."""

    def __init__(self, reward, name: str, spec: str, chunk_size: int):
        self.reward, self.name, self.spec, self.chunk_size = reward, name, spec, chunk_size

    def to(self, device: torch.device | str) -> PluginScorer:
        if hasattr(self.reward, "to"):
            moved = self.reward.to(device)
            self.reward = moved if moved is not None and callable(moved) else self.reward
        return self

    def probe(self, device: torch.device) -> None:
        """One call on two fixed images (no random numbers drawn): a wrong answer, or no finite score for either
        image, is an error before any run folder exists."""
        ramp = torch.linspace(0, 1, PROBE_SIZE, device=device)
        images = torch.stack([ramp.expand(3, PROBE_SIZE, PROBE_SIZE), 1 - ramp.expand(3, PROBE_SIZE, PROBE_SIZE)])
        scores = self(["a photo of a cat", "a painting of a boat"], images.contiguous())
        if not torch.isfinite(scores).any():
            raise PluginAnswerError(f"reward plug-in {self.spec!r} scored both probe images (two {PROBE_SIZE} px "
                                    f"colour ramps) {scores.tolist()}: a reward must give ordinary images finite "
                                    f"scores (NaN marks one image invalid, not every one).")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        check_batch(prompts, images)
        parts = [self._checked(self._call(list(prompts[s]), images[s].clone()), images[s]) for s in
                 chunk_slices(images.shape[0], self.chunk_size)]  # its own copy: writing into it changes nothing else
        return torch.cat(parts) if parts else torch.zeros(0, device=images.device)

    def _call(self, prompts: list[str], images: torch.Tensor):
        try:
            return self.reward(prompts, images)
        except SystemExit as err:  # not an Exception: it would end the run with the plug-in's exit status
            raise PluginAnswerError(f"reward plug-in {self.spec!r}: {failure(err)}") from err

    def _checked(self, scores, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        want = f"a float tensor of shape [{b}] on {images.device}"
        if not isinstance(scores, torch.Tensor):
            raise PluginAnswerError(f"reward plug-in {self.spec!r} returned a {type(scores).__name__}; it must return "
                                    f"{want} (one score per image).")
        if tuple(scores.shape) != (b,) or not scores.is_floating_point() or scores.device != images.device:
            raise PluginAnswerError(f"reward plug-in {self.spec!r} returned a {scores.dtype} tensor of shape "
                                    f"{list(scores.shape)} on {scores.device} for {b} images; it must return {want}.")
        out = scores.float()
        beyond = torch.isfinite(scores) & ~torch.isfinite(out)
        if beyond.any():
            raise PluginAnswerError(f"reward plug-in {self.spec!r} returned {scores.dtype} scores beyond float32's "
                                    f"range (e.g. {scores[beyond][0].item():g}; at most about 3.4e38), which would "
                                    f"become inf: scale them down.")
        return out

    def __repr__(self) -> str:
        return f"PluginScorer({self.name}: {self.spec})"
