"""Run logging: a JSONL file always, wandb optionally, rollout pairs as PNG. Ranks other than 0 get a NullLogger,
so call sites need no rank checks."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from fdfo.files import atomic_path, disk_full_error, is_disk_full, make_folder, write_text_atomic
from fdfo.images import to_pil

LOG_FILE = "log.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def log_pairs(self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        pass

    def draw_curve(self) -> None:
        pass

    def close(self) -> None:
        pass


def repair_log(path: Path, first_redone_epoch: int) -> None:
    """Make log.jsonl read like an uninterrupted run before a (resumed) run appends to it: drop a torn last line (a
    crash or full disk mid-write) and every record of an epoch >= `first_redone_epoch`, which the run is about to
    redo. Rewritten atomically, and only when something changes."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            continue  # torn or garbled
        epoch = record.get("epoch")
        if isinstance(epoch, int) and epoch >= first_redone_epoch:
            continue
        kept.append(line)
    if "".join(kept) != text:
        write_text_atomic(path, "".join(kept))


def wandb_run_id(run_dir: Path) -> str:
    """A random wandb run id, made once per run folder and reused on resume (folder names repeat across machines)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(8)
    write_text_atomic(path, run_id + "\n")
    return run_id


class RunLogger(NullLogger):
    """Appends one JSON object per line to `run_dir/log.jsonl`; mirrors records and images to wandb if asked.

    first_redone_epoch: on resume, the epoch the run continues from; the log's records from it on are dropped (see
    `repair_log`). Each record is written whole with one append; a failed write (full disk) is cut back off."""

    def __init__(self, run_dir: Path, config: dict, use_wandb: bool = False, name: str | None = None,
                 first_redone_epoch: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_FILE
        repair_log(self.path, first_redone_epoch)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("--log-wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="fdfo", name=name or self.run_dir.name, config=config,
                                    dir=str(self.run_dir), resume="allow", id=wandb_run_id(self.run_dir))

    def log(self, record: dict) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._append((json.dumps(clean) + "\n").encode("utf-8"))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def log_pairs(self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        """images `[2n, 3, H, W]` in [0, 1] interleaved a0, b0, ...; prompts `[n]`; rewards `[2n]`."""
        folder = self.run_dir / "images"
        make_folder(folder)
        pictures = []
        for i, prompt in enumerate(prompts):
            picture = pair_picture(images[2 * i], images[2 * i + 1], prompt, float(rewards[2 * i]),
                                   float(rewards[2 * i + 1]))
            with atomic_path(folder / f"epoch-{epoch:07d}-pair-{i:02d}.png") as tmp:  # full disk: one error line
                picture.save(tmp, format="PNG")
            pictures.append(picture)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"epoch": epoch, "pairs": [wandb.Image(p, caption=t) for p, t in zip(pictures, prompts)]})

    def _append(self, data: bytes) -> None:
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # never leave a torn line behind
            except OSError:
                pass  # repair_log drops it on the next start
            if is_disk_full(e):
                raise disk_full_error(self.run_dir, LOG_FILE) from None
            raise

    def draw_curve(self) -> None:
        """Redraw `reward_curve.png` from the log: the run's progress without wandb."""
        from fdfo.plots import write_reward_curve

        write_reward_curve(self.run_dir / LOG_FILE, self.run_dir / "reward_curve.png")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.wandb is not None:
            self.wandb.finish()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


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
