"""generate.py: a labelled image grid from one or more checkpoints over a prompt list.

Layout: a title band with one title per checkpoint (its name and guidance scale, two lines at most), then for every
prompt a caption band (the prompt, wrapped to two lines) above one block of `rows x cols` images per checkpoint,
blocks side by side with a small gap. Image `index = prompt * rows * cols + row * cols + col` of every block is
sampled from seed `seed + index`, so the checkpoints of a grid share their initial noise and the grid does not depend
on the batch size or on the number of GPUs (under torchrun each rank generates a share of the images; rank 0 draws
the grid).
Text uses PIL's built-in scalable font, so nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.files import atomic_path, make_folder
from fdfo.images import to_uint8
from fdfo.outputs import check_output_path

# Written for this project: varied subjects, styles and the things text-to-image models get wrong (counting, spatial
# relations, text, hands, reflections).
BUILTIN_PROMPTS = (
    "a photo of a red fox sitting in fresh snow at sunrise, shallow depth of field",
    "an astronaut riding a horse across a desert under a purple sky, digital art",
    "a bowl of ramen with a soft-boiled egg and chopsticks on a wooden table, food photography",
    "three yellow rubber ducks to the left of a blue toothbrush",
    "a watercolor painting of a lighthouse on a rocky coast during a storm",
    "a storefront sign that says \"OPEN LATE\" in neon letters, at night in the rain",
    "a portrait of an elderly fisherman with a white beard and a wool cap, film photograph",
    "an isometric 3D render of a tiny island with a windmill and a waterfall",
    "a cat wearing a knitted sweater reading a book in an armchair, oil painting",
    "a glass teapot with blooming tea on a windowsill, sunlight and reflections",
    "anime style, a girl with a red umbrella standing at a rainy train station",
    "a steam locomotive crossing a stone bridge over a misty valley, autumn colors",
    "two hands holding a small green seedling in dark soil, macro photograph",
    "a futuristic city skyline at dusk with flying cars, concept art",
    "a still life of pears, grapes and a silver jug in the style of a Dutch master",
)


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: checkpoints side by side, prompts stacked, `rows x cols` images per block."""

    num_checkpoints: int
    num_prompts: int
    rows: int
    cols: int
    image_size: int

    @property
    def font_size(self) -> int:
        return max(10, self.image_size // 20)

    @property
    def pad(self) -> int:
        return max(2, self.font_size // 2)

    @property
    def line_height(self) -> int:
        return math.ceil(self.font_size * 1.25)

    @property
    def title_height(self) -> int:
        return 2 * self.line_height + 2 * self.pad  # checkpoint name, then its guidance scale when it does not fit

    @property
    def caption_height(self) -> int:
        return 2 * self.line_height + 2 * self.pad  # at most two lines of prompt

    @property
    def block_width(self) -> int:
        return self.cols * self.image_size

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        width = self.num_checkpoints * self.block_width + (self.num_checkpoints - 1) * self.pad
        height = self.title_height + self.num_prompts * (self.caption_height + self.rows * self.image_size)
        return width, height

    def block_x(self, checkpoint: int) -> int:
        return checkpoint * (self.block_width + self.pad)

    def caption_y(self, prompt: int) -> int:
        return self.title_height + prompt * (self.caption_height + self.rows * self.image_size)

    def cell(self, checkpoint: int, prompt: int, row: int, col: int) -> tuple[int, int]:
        """Top-left corner (x, y) of one image."""
        return (self.block_x(checkpoint) + col * self.image_size,
                self.caption_y(prompt) + self.caption_height + row * self.image_size)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's embedded scalable font (FreeType); bitmap font without it


def _clip(line: str, font, width: int) -> str:
    """Shorten `line` to `width` pixels, ending it in an ellipsis when cut."""
    if font.getlength(line) <= width:
        return line
    line = line.rstrip("…")
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def _fit_lines(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines; an ellipsis marks text that did not fit."""
    words, lines = text.split(), []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] += "…"
    return [_clip(line, font, width) for line in lines]


def draw_grid(images: torch.Tensor, layout: GridLayout, titles: list[str], prompts: list[str]):
    """images: uint8 `[checkpoints, prompts * rows * cols, 3, S, S]` in the module docstring's index order.
    Returns a PIL RGB image of `layout.size`."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", layout.size, "white")
    draw, font = ImageDraw.Draw(canvas), _font(layout.font_size)
    for k, title in enumerate(titles):
        for i, line in enumerate(_fit_lines(title, font, layout.block_width - 2 * layout.pad, 2)):
            draw.text((layout.block_x(k) + layout.pad, layout.pad + i * layout.line_height), line, fill="black",
                      font=font)
    width = layout.size[0] - 2 * layout.pad
    per_prompt = layout.rows * layout.cols
    for p, prompt in enumerate(prompts):
        for i, line in enumerate(_fit_lines(prompt, font, width, 2)):
            draw.text((layout.pad, layout.caption_y(p) + layout.pad + i * layout.line_height), line, fill="dimgray",
                      font=font)
        for k in range(len(titles)):
            for j in range(per_prompt):
                pixels = images[k, p * per_prompt + j].permute(1, 2, 0).contiguous().numpy()
                canvas.paste(Image.fromarray(pixels), layout.cell(k, p, j // layout.cols, j % layout.cols))
    return canvas


def _generate_share(gen, prompts: list[str], seeds: list[int], batch_size: int, bar) -> torch.Tensor:
    """This rank's images, round-robin over ranks, padded to the same count on every rank; gathered in full order."""
    rank, world, total = dist.get_rank(), dist.get_world_size(), len(prompts)
    mine = list(dist.round_robin(total, rank, world)) or [0]
    mine += [mine[-1]] * (math.ceil(total / world) - len(mine))  # equal shapes for the gather; extras are dropped
    out = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        out.append(to_uint8(gen.generate([prompts[j] for j in chunk], [seeds[j] for j in chunk])))
        bar.update(len(chunk))
    gathered = dist.all_gather_cat(torch.cat(out).to(gen.device)).cpu()  # [world * per_rank, 3, S, S]
    return dist.unshard(gathered, total, world)


def generate_grid(cfg) -> Path:
    """Run generate.py's configuration (see generate.py): load, sample, draw, save; returns the output path."""
    from tqdm import tqdm

    from fdfo.cli import check_device
    from fdfo.generation import check_guidance_scale, check_resolution, describe, load_generator, shared_settings
    from fdfo.hub import resolve_checkpoint
    from fdfo.prompts import load_prompts

    out = Path(cfg.out)
    if out.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        raise ValueError(f"--out {cfg.out}: the grid is written as JPEG or PNG; end the name in .jpg, .jpeg or .png")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; pass a file name ending in .jpg, .jpeg or .png")
    check_output_path("--out", out, folder=False)
    check_device("--device", cfg.device)
    for name in ("grid_rows", "grid_cols", "batch_size", "num_steps", "num_prompts"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    check_guidance_scale(cfg.guidance_scale)
    prompts = load_prompts(cfg.prompts) if cfg.prompts else list(BUILTIN_PROMPTS)
    prompts = prompts[:cfg.num_prompts]
    device = dist.init(cfg.device)
    with dist.rank0_first():  # rank 0 downloads into the shared cache first
        checkpoints = [resolve_checkpoint(spec) for spec in (cfg.checkpoint or [None])]
    pretrained, steps, size, why = shared_settings(checkpoints, cfg.pretrained_model, cfg.num_steps, cfg.resolution)

    per_prompt = cfg.grid_rows * cfg.grid_cols
    grid_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [cfg.seed + index for index in range(len(grid_prompts))]
    generators = []
    for ckpt in checkpoints:  # all adapters are checked against the model before any sampling
        with dist.rank0_first():
            generators.append(load_generator(ckpt, pretrained, device, cfg.guidance_scale, steps, size,
                                             base=generators[0].base if generators else None))
        generators[-1].sampling_source = why
        dist.print0(describe(generators[-1]))
    blocks = []
    with tqdm(total=len(generators) * len(grid_prompts), desc="images", disable=dist.get_rank() != 0) as bar:
        for gen in generators:
            blocks.append(_generate_share(gen, grid_prompts, seeds, cfg.batch_size, bar))
    titles = [f"{gen.label}  (cfg {gen.guidance_scale:g})" for gen in generators]
    if dist.get_rank() == 0:
        layout = GridLayout(len(checkpoints), len(prompts), cfg.grid_rows, cfg.grid_cols, generators[0].resolution)
        canvas = draw_grid(torch.stack(blocks), layout, titles, prompts)
        make_folder(out.parent)
        jpeg = out.suffix.lower() in (".jpg", ".jpeg")
        with atomic_path(out) as tmp:  # a full disk: one error line, no half image
            canvas.save(tmp, format="JPEG" if jpeg else "PNG", **({"quality": 92} if jpeg else {}))
        print(f"wrote {out} ({canvas.width} x {canvas.height} px: {len(prompts)} prompt(s) x {per_prompt} image(s) x "
              f"{len(checkpoints)} checkpoint(s))", flush=True)
    dist.barrier()
    return out
