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

from fdfo.checkpoints import BEST_FILE, BEST_SUFFIX
from fdfo.files import atomic_path, disk_full_error, is_disk_full, make_folder, write_text_atomic
from fdfo.heldout_config import HELDOUT_KEY
from fdfo.images import to_pil

LOG_FILE = "log.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def log_pairs(self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        pass

    def log_heldout(self, epoch: int, picture: Image.Image) -> None:
        pass

    def draw_curve(self) -> None:
        pass

    def close(self) -> None:
        pass


def repair_log(path: Path, first_redone_epoch: int) -> None:
    """Make log.jsonl read like an uninterrupted run before a (resumed) run appends to it: drop a torn last line (a
    crash or full disk mid-write) and every record of an epoch >= `first_redone_epoch`, which the run is about to
    redo, except the held-out evaluation of `first_redone_epoch` itself: it evaluated the checkpoint the run resumes
    from, so it is kept, not repeated (fdfo/heldout.py). Rewritten atomically, and only when something changes."""
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
        if isinstance(epoch, int) and epoch >= first_redone_epoch and not (
                epoch == first_redone_epoch and HELDOUT_KEY in record):
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

    def log_heldout(self, epoch: int, picture: Image.Image) -> None:
        """A held-out evaluation's grid of its first prompts: `images/heldout-epoch-XXXXXXX.png`, and to wandb."""
        folder = self.run_dir / "images"
        make_folder(folder)
        with atomic_path(folder / f"heldout-epoch-{epoch:07d}.png") as tmp:  # full disk: one error line
            picture.save(tmp, format="PNG")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"epoch": epoch, "heldout_images": wandb.Image(picture, caption=f"held-out, epoch {epoch}")})

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


def run_summary(run_dir: Path, newest_checkpoint: Path | None) -> str:
    """What a finished run leaves and where: the reward from its first to its last logged epoch, the newest
    checkpoint, the reward curve and the rollout pair pictures (a few lines for the end of train.py)."""
    run_dir = Path(run_dir)
    records = [r for r in read_records(run_dir / LOG_FILE) if isinstance(r.get("epoch"), int)]
    epochs = [r for r in records if "reward_mean" in r]
    lines = [f"done: {run_dir}"]
    if epochs:
        first, last = epochs[0], epochs[-1]
        a, b = (_number(r["reward_mean"]) for r in (first, last))
        lines.append(f"  reward (mean over the epoch's samples): {a:.4g} at epoch {first['epoch']} -> {b:.4g} at epoch "
                     f"{last['epoch']} ({b - a:+.4g})")
    heldout = [r for r in records if HELDOUT_KEY in r]
    if heldout:
        first, last = heldout[0], heldout[-1]
        a, b = (_number(r[HELDOUT_KEY]) for r in (first, last))
        try:
            best = f"best: epoch {json.loads((run_dir / BEST_FILE).read_text())['epoch']} ({run_dir}{BEST_SUFFIX})"
        except (OSError, ValueError, KeyError, TypeError):
            best = "no best.json (no evaluated checkpoint)"
        lines.append(f"  held-out reward ({first.get('heldout_num_prompts')} prompts): {a:.4g} at epoch "
                     f"{first['epoch']} -> {b:.4g} at epoch {last['epoch']}; {best}")
    lines.append(f"  newest checkpoint: {newest_checkpoint if newest_checkpoint is not None else 'none yet'}")
    if (run_dir / "reward_curve.png").is_file():
        lines.append(f"  reward curve: {run_dir / 'reward_curve.png'}")
    pictures = sorted((run_dir / "images").glob("epoch-*-pair-*.png"))
    if pictures:
        logged = sorted({int(p.name.split("-")[1]) for p in pictures})
        lines.append(f"  rollout pairs: {run_dir / 'images'}/ ({len(pictures)} pictures, epoch"
                     f"{'s' if len(logged) > 1 else ''} {', '.join(map(str, logged))})")
    else:
        lines.append("  rollout pairs: none saved (--image-log-freq 0, or no logged epoch yet)")
    return "\n".join(lines)


def read_records(path: Path) -> list[dict]:
    """The records of a log.jsonl (unreadable lines skipped); [] when there is no log."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _number(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


PAIR_MIN_SIZE = 256  # px: smaller rollouts (the tiny model's 64 px) are enlarged by a whole factor, nearest pixel


def wrap_text(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of all of `text` to lines of at most `width` pixels; a word wider than a line is split."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and font.getlength(word) > width:
            cut = 1
            while cut < len(word) - 1 and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def pair_picture(a: torch.Tensor, b: torch.Tensor, prompt: str, reward_a: float, reward_b: float) -> Image.Image:
    """The two branches side by side, each at least PAIR_MIN_SIZE px, their rewards under them and the whole prompt
    wrapped underneath."""
    a_img, b_img = to_pil(a), to_pil(b)
    scale = max(1, math.ceil(PAIR_MIN_SIZE / min(a_img.size)))
    if scale > 1:
        a_img, b_img = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (a_img, b_img))
    w, h = a_img.size
    font = ImageFont.load_default(size=max(12, w // 20))
    line = int(font.size * 1.4)
    pad = 4
    lines = wrap_text(prompt, font, 2 * w - 2 * pad)
    canvas = Image.new("RGB", (2 * w, h + (len(lines) + 1) * line + 2 * pad), "white")
    canvas.paste(a_img, (0, 0))
    canvas.paste(b_img, (w, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, h + pad), f"reward a: {reward_a:.4g}", fill="black", font=font)
    draw.text((w + pad, h + pad), f"reward b: {reward_b:.4g}", fill="black", font=font)
    for i, text in enumerate(lines):
        draw.text((pad, h + pad + (i + 1) * line), text, fill="dimgray", font=font)
    return canvas
