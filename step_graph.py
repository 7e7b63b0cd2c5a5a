"""The whole training step as CUDA graphs (train.cuda_graph = true): an opt-in wrapper around train.py's step,
for GPUs, with everything recording asks for kept here.

    step = GraphedStep(functools.partial(train_step, model, ...), opt, device, pad_multiple)
    out = step(micro_batches)        # the first step of a shape runs, the second records, later ones replay
"""
from __future__ import annotations

import torch


class GraphedStep:
    """A training step, `step(micro) -> outputs` (`train_step`: forward, backward, clipping, AdamW), recorded as one
    CUDA graph per batch shape and replayed.

    A replay is one launch for the whole step, where the step otherwise costs the host thousands of kernel
    launches. What recording asks, all here or in config.py's `check_config`:
    - few shapes: each batch is padded by `Batch.pad_static` (rows to `pad_multiple`, labelled positions and media
      to few counts, at weight 0), since every shape is a graph of its own; at most `max_graphs` are recorded and
      the others run as they are;
    - no host reads and fixed addresses: the learning rates live in device tensors that the replays read (the
      schedule's value is copied in before each step), AdamW is `capturable`, autocast keeps no cache of cast
      weights, and fp16's loss scaling (which reads the host) is refused;
    - under torchrun, no DDP: its hooks cannot be recorded, so `step` averages the gradients itself with one
      all-reduce, recorded in each rank's graph.
    The first step of a shape runs as it is (it compiles the layers and sets up the optimizer state), the second
    is recorded and replayed, and later ones copy their batch into the recorded inputs and replay. All graphs
    share one memory pool: their outputs are valid until the next step. A model built for this step (build.py,
    train.cuda_graph) recomputes its adapters' dropout in the backward, memory the recorded step gets for free
    (`lora.lora_down`)."""

    max_graphs = 16

    def __init__(self, step, opt, device: torch.device, pad_multiple: int):
        if device.type != "cuda":
            raise ValueError("train.cuda_graph records the step on a GPU; on CPU set it to false")
        self.step, self.opt, self.pad_multiple = step, opt, pad_multiple
        self.graphs: dict[tuple, tuple] = {}  # shapes -> (graph, its input batches, its outputs)
        self.seen: set[tuple] = set()
        self.told = False  # that the shapes outnumber max_graphs
        self.pool = None
        self.side = torch.cuda.Stream()
        self.lrs = [torch.tensor(0.0, device=device) for _ in opt.param_groups]  # read by the replays
        for g in opt.param_groups:
            g["capturable"] = True

    def run(self, micro: list):
        """Run or record the step with the learning rates as device tensors, then give the groups their floats."""
        floats = [g["lr"] for g in self.opt.param_groups]
        for g, lr in zip(self.opt.param_groups, self.lrs):
            g["lr"] = lr
        try:
            return self.step(micro)
        finally:
            for g, lr in zip(self.opt.param_groups, floats):
                g["lr"] = lr

    def __call__(self, micro: list):
        for g, lr in zip(self.opt.param_groups, self.lrs):
            lr.fill_(g["lr"])  # the schedule's value, for the replay (or the run) below
        micro = [b.pad_static(self.pad_multiple) for b in micro]
        key = tuple(tuple(t.shape) for b in micro for t in b.tensors())
        if key in self.graphs:
            graph, inputs, outputs = self.graphs[key]
            for static, b in zip(inputs, micro):
                for s, t in zip(static.tensors(), b.tensors()):
                    s.copy_(t, non_blocking=True)
            graph.replay()
            return outputs
        full = len(self.graphs) == self.max_graphs
        if key not in self.seen or full:  # warm-up, on a side stream as capture asks
            if full and not self.told:
                print(f"train.cuda_graph: {self.max_graphs} batch shapes are recorded; new ones run unrecorded, "
                      "slower (a larger data.pad_multiple makes fewer shapes)", flush=True)
                self.told = True
            self.seen.add(key)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                outputs = self.run(micro)
            torch.cuda.current_stream().wait_stream(self.side)
            return outputs
        inputs = [b.apply(torch.clone) for b in micro]
        self.opt.zero_grad(set_to_none=True)  # the graph's backward writes the gradients it allocates
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile, which is harmless
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.run(inputs)
        except Exception as e:
            raise RuntimeError(f"recording the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "train with train.cuda_graph = false") from e
        self.pool = graph.pool()
        self.graphs[key] = graph, inputs, outputs
        graph.replay()
        return outputs
