"""Throughput benchmark of one FDFO epoch: `python -m fdfo.bench` (docs/benchmarks.md, docs/performance.md).

Runs the real phases that train.py runs (sample_phase with its decode and reward, build_training_set, train_phase)
on random-init models of the real SD3.5-Medium shapes, so nothing is downloaded: the MMDiT-X transformer and the
16-channel VAE at their published configs (fdfo/models/shapes.py), fake text embeddings of the real shapes
(77 CLIP + 128 T5 tokens x 4096, pooled 2048) and a stub reward, or with --reward pickscore a random-init CLIP of
PickScore's ViT-H/14 shape scored by the repository's own CLIPScorer (reward.py; --overlap-rewards turns on
--reward.overlap-preprocessing). Timing is the same work as a real epoch except the text encoders (and the reward
model with the stub). --flops-only counts the FLOPs on the meta device (no weights, no GPU) with FlopCounterMode.

    python -m fdfo.bench --tiny                     # CPU, tiny shapes, a few seconds
    python -m fdfo.bench --pairs 4 --out b.json     # on a GPU, full shape, 512 px, 40 steps
    python -m fdfo.bench --pairs 6 --sample-batch 3 --reward pickscore --overlap-rewards
    python -m fdfo.bench --flops-only
    python -m fdfo.bench --census --precision fp16 --out c.json   # kernels counted on a CPU, and their cost model
    python -m fdfo.bench.probe --out p.json         # the speed changes per call on a GPU (--tiny: CPU rehearsal)
    python -m fdfo.bench.compile_probe --out-dir c  # compile seconds and compiled calls, each step time-capped

The package: cli.py (flags, checks, main, the summary), epoch.py (the measured epochs), models.py (the models of
the real shapes), flops.py (the FLOP model), profile.py (--profile), report.py (--report), reward.py (the
PickScore-shaped reward), side.py (the models a run holds beside the transformer), census.py and dispatch.py (the
kernel census, --census), cost.py (its cost model), probe.py and probe_calls.py (the per-call probe), compile_probe.py
and compile_steps.py (the compile probe), report_probe.py (their sections of --report).
"""

from fdfo.bench.cli import main, parse_args, print_summary
from fdfo.bench.epoch import bench_config, run
from fdfo.bench.flops import count_flops, flop_text, flops_record, peak_tflops, with_lora
from fdfo.bench.models import TEXT_TOKENS, StubReward, build_models
from fdfo.bench.report import report_markdown

__all__ = ["TEXT_TOKENS", "StubReward", "bench_config", "build_models", "count_flops", "flop_text", "flops_record",
           "main", "parse_args", "peak_tflops", "print_summary", "report_markdown", "run", "with_lora"]
