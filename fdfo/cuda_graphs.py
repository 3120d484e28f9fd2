"""`--train.cuda-graphs`: the training micro-batch (forward, loss, backward into the LoRA gradients) captured once per
training phase in a CUDA graph and replayed, so that the host launches one graph instead of some 18,000 aten ops.

What replaying needs, and how the eager path already provides it:
- every tensor the micro-batch reads or writes stays at one address: the epoch's training set (`TrainingSet`), the
  weights, the grad scaler's scale and the LoRA gradients, which are zeroed in place between optimizer steps
  (`zero_grad(set_to_none=False)`, train_phase) so that the captured backward accumulates into the same tensors;
- the micro-batch's rows enter through a static device buffer (`ids` copied into it), and the micro-batch indexes
  the training set on the device without a host sync (fdfo/phases.py:_micro_batch);
- autocast is entered inside the captured region (SD3Policy.velocity); its cast cache only holds the LoRA weights'
  casts of one forward, made and dropped inside the capture.
Under DDP the micro-batch that all-reduces (the last of each optimizer step) runs eagerly through the DDP wrapper; the
others replay the graph of the bare model, which is what `no_sync` runs. The first micro-batches of the phase run
eagerly too (warm-up on a side stream, as the CUDA-graph documentation asks), and so does every micro-batch until
there is one to capture.

On a CPU (tests) `capture=False` runs the same static-buffer path without a graph: tests/test_cuda_graphs.py checks it
against the default path bit for bit. The capture itself is checked on a GPU only (marked gpu; not yet run).
"""

from __future__ import annotations

import torch

WARMUP_MICRO_BATCHES = 2  # eager micro-batches of the bare model before the capture


class GraphedMicroBatch:
    """Wraps `micro_batch(policy, module, scaler, data, ids, cfg, step_size) -> sums [4]` (fdfo/phases.py) for one
    training phase; called exactly like it. `calls` records how each call ran: "eager" (DDP's all-reducing
    micro-batch), "warmup", "capture" (capture, then replay) or "replay" ("static" without capture)."""

    def __init__(self, micro_batch, capture: bool):
        self.micro_batch = micro_batch
        self.capture = capture
        self.static_ids: torch.Tensor | None = None
        self.static_sums: torch.Tensor | None = None
        self.graph = None
        self.calls: list[str] = []

    def __call__(self, policy, module, scaler, data, ids: torch.Tensor, cfg, step_size: int) -> torch.Tensor:
        if all_reduces(module):
            self.calls.append("eager")
            return self.micro_batch(policy, module, scaler, data, ids, cfg, step_size)
        bare = getattr(module, "module", module)  # under no_sync, DDP adds nothing to the micro-batch's arithmetic
        if self.static_ids is None:
            self.static_ids = torch.empty_like(ids)
        if ids.shape != self.static_ids.shape:
            raise RuntimeError(f"--train.cuda-graphs: micro-batch of {len(ids)} rows, the graph holds "
                               f"{len(self.static_ids)}")  # batch_geometry splits every step evenly
        self.static_ids.copy_(ids)
        args = (policy, bare, scaler, data, self.static_ids, cfg, step_size)
        if not self.capture:
            self.calls.append("static")
            return self.micro_batch(*args)
        if sum(c == "warmup" for c in self.calls) < WARMUP_MICRO_BATCHES:
            self.calls.append("warmup")
            return _on_side_stream(self.micro_batch, args)
        if self.graph is None:
            self.calls.append("capture")
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_sums = self.micro_batch(*args)
        else:
            self.calls.append("replay")
        self.graph.replay()
        return self.static_sums.clone()  # the next replay overwrites the graph's output


def all_reduces(module) -> bool:
    """Whether a backward through `module` all-reduces the gradients: DDP outside `no_sync`."""
    return bool(getattr(module, "require_backward_grad_sync", False)) and hasattr(module, "no_sync")


def _on_side_stream(fn, args):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return out
