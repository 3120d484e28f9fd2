"""Run logging: a JSONL file always, wandb optionally, rollout pairs as PNG. Ranks other than 0 get a NullLogger,
so call sites need no rank checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def log_pairs(self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    """Appends one JSON object per line to `run_dir/log.jsonl`; mirrors records and images to wandb if asked."""

    def __init__(self, run_dir: Path, config: dict, use_wandb: bool = False, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.file = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("--log-wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="fdfo", name=name or self.run_dir.name, config=config,
                                    dir=str(self.run_dir), resume="allow", id=self.run_dir.name)

    def log(self, record: dict) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def log_pairs(self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        """images `[2n, 3, H, W]` in [0, 1] interleaved a0, b0, ...; prompts `[n]`; rewards `[2n]`."""
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        pictures = []
        for i, prompt in enumerate(prompts):
            picture = pair_picture(images[2 * i], images[2 * i + 1], prompt, float(rewards[2 * i]),
                                   float(rewards[2 * i + 1]))
            picture.save(folder / f"epoch-{epoch:07d}-pair-{i:02d}.png")
            pictures.append(picture)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"epoch": epoch, "pairs": [wandb.Image(p, caption=t) for p, t in zip(pictures, prompts)]})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_pil(image: torch.Tensor) -> Image.Image:
    """`[3, H, W]` float in [0, 1] -> 8-bit RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def pair_picture(a: torch.Tensor, b: torch.Tensor, prompt: str, reward_a: float, reward_b: float) -> Image.Image:
    """The two branches side by side with their rewards, the prompt underneath."""
    a_img, b_img = to_pil(a), to_pil(b)
    w, h = a_img.size
    font = ImageFont.load_default(size=max(10, w // 20))
    line = int(font.size * 1.4)
    canvas = Image.new("RGB", (2 * w, h + 3 * line), "white")
    canvas.paste(a_img, (0, 0))
    canvas.paste(b_img, (w, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, h + 2), f"a: {reward_a:.4g}", fill="black", font=font)
    draw.text((w + 4, h + 2), f"b: {reward_b:.4g}", fill="black", font=font)
    text = prompt
    while len(text) > 1 and draw.textlength(text, font=font) > 2 * w - 8:  # shorten to the width, marking the cut
        text = text[: len(text) * 9 // 10 - 1].rstrip() + "…"
    draw.text((4, h + line + 2), text, fill="black", font=font)
    return canvas
