"""The fast decode engine on CUDA.

Prefill runs eagerly (dense, batched).  Each decode step (embed, 32 blocks with sparse
or dense projections, lm_head, sampling, writing the token and advancing the position)
is compiled with ``torch.compile`` and captured once as a CUDA graph; generating a
token is then one graph replay with no host work and no host sync.  Thresholds live in
a device buffer read by the kernels, so changing the sparsity level needs no
recapture; switching between dense and sparse does (it changes which kernels run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from teal.engine.sampling import sample
from teal.model.decoder import Transformer


@dataclass
class DecodeTiming:
    tokens: Tensor  # [n_new] on the device
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds else 0.0


class CudaEngine:
    """One model, one static cache, one captured decode step (batch 1).

    ``compile``: ``"blocks"`` (default) compiles the decoder block once and reuses it for
    every layer (all layers share its code), which keeps compile time to seconds; the
    glue around the blocks is eager but captured in the same graph, so it costs no host
    time.  ``"step"`` compiles the whole step as one graph (slower to compile);
    ``"none"`` captures the eager step (to separate compiler and graph effects)."""

    def __init__(
        self,
        model: Transformer,
        max_len: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        compile: str = "blocks",
        graph: bool = True,
    ) -> None:
        if compile not in ("blocks", "step", "none"):
            raise ValueError(f"compile must be blocks, step or none, not {compile!r}")
        if graph and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        # graph=False runs the same step eagerly, one call per token: the state machine
        # (positions, output buffer) is then testable on the CPU.
        self.use_graph = graph
        self.model = model
        self.max_len = max_len
        self.temperature = temperature
        self.top_p = top_p
        self.compile = compile
        device = model.device
        if device.type == "cuda":
            # Dense and sparse steps alike: attention as one kernel instead of five or six.
            model.set_decode_attention("triton")
        model.setup_cache(1, max_len)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # out[i] is the token at position i; one spare slot for warm-up steps at the end.
        self.out = torch.zeros(max_len + 1, dtype=torch.long, device=device)
        # One captured step per sparsity mode (dense, sparse, sparse with scales): all of
        # them read and write the same static buffers, so switching modes is a lookup.
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compile_seconds = 0.0
        fn = self._step
        if compile == "step":
            fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        elif compile == "blocks":
            model.decode_blocks = [
                torch.compile(block, fullgraph=True, dynamic=False) for block in model.layers
            ]
        else:
            model.decode_blocks = None
        self._fn = fn

    def _step(self) -> None:
        logits = self.model(self.tok, self.pos)
        nxt = sample(logits[:, -1], self.temperature, self.top_p)
        # State advances inside the graph: the new token (position pos + 1) is written
        # to the output buffer, becomes the next input, and the position moves on.
        self.out.index_copy_(0, self.pos + 1, nxt)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.add_(1)

    def _key(self) -> tuple:
        m = self.model
        # The identities of the scales and of the low-rank split (teal.model.lowrank) are
        # part of the key (a graph reads the tensors it was captured with); the entry holds
        # references to them, so the ids stay unique.
        return (m.sparse_mode, m.sparse_backend, id(m.sparse_scales), id(m.lowrank_bases))

    def _captured_tensors(self) -> tuple:
        m = self.model
        split = [(blk.mlp.lr_u, blk.mlp.lr_uw) for blk in m.layers]
        return (m.sparse_scales, m.lowrank_bases, split)

    def capture(self) -> float:
        """Compile and capture the step for the model's current sparsity mode; returns the
        seconds spent.  Warm-up runs write scratch positions of the cache, which the next
        prefill overwrites."""
        if not self.use_graph:
            return 0.0
        key = self._key()
        if key in self.graphs:
            self.graph = self.graphs[key][0]
            return 0.0
        t0 = time.perf_counter()
        saved_pos = self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self.pos.fill_(self.max_len - 1)
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.pos.fill_(self.max_len - 1)
        with torch.cuda.graph(graph), torch.no_grad():
            self._fn()
        self.pos.copy_(saved_pos)
        torch.cuda.synchronize()
        self.graph = graph
        self.graphs[key] = (graph, self._captured_tensors())
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> None:
        """Dense prefill of ``prompt`` ``[1, T]``; sets the first generated token."""
        n = prompt.shape[1]
        logits = self.model(prompt, torch.arange(n, device=prompt.device))
        nxt = sample(logits[:, -1], self.temperature, self.top_p)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.fill_(n)
        self.out[n] = nxt[0]

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int) -> DecodeTiming:
        """Prefill, then ``new_tokens - 1`` replayed decode steps, timed without syncs
        between them."""
        n = prompt.shape[1]
        if n + new_tokens > self.max_len:
            raise ValueError(f"{n} + {new_tokens} positions exceed the engine's {self.max_len}")
        compile_s = self.capture()
        self._sync()
        t0 = time.perf_counter()
        self.prefill(prompt)
        self._sync()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._replay()
        self._sync()
        t2 = time.perf_counter()
        return DecodeTiming(self.out[n : n + new_tokens].clone(), t1 - t0, t2 - t1, compile_s)

    def stream_tokens(self, prompt: Tensor, new_tokens: int):
        """Interactive use: yields each token id as it is made (one sync per token)."""
        n = prompt.shape[1]
        self.capture()
        self.prefill(prompt)
        yield int(self.out[n])
        for i in range(1, new_tokens):
            self._replay()
            yield int(self.out[n + i])

    def _replay(self) -> None:
        if self.use_graph:
            self.graph.replay()
        else:
            with torch.no_grad():
                self._fn()

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()


def benchmark(
    model: Transformer,
    thresholds: dict[float, Tensor | None],
    *,
    new_tokens: int = 256,
    prompt_len: int = 16,
    repeats: int = 3,
    backend: str = "triton",
    compile: str = "blocks",
    seed: int = 0,
) -> list[dict]:
    """Decode tokens/s for each sparsity level (``None`` thresholds: dense) in one
    process with the same prompt and warm-up: the median of ``repeats`` timed runs of
    ``new_tokens`` greedy steps after one untimed run.  Compile time is reported apart."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    prompt = prompt.to(model.device)
    engine = CudaEngine(model, prompt_len + new_tokens, compile=compile)
    rows = []
    for p, thr in thresholds.items():
        if thr is None:
            model.clear_sparsity()
        else:
            model.set_sparsity(thr, mode="decode")
            model.set_backend(backend)
        compile_s = engine.capture()  # one graph per mode: dense and sparse differ
        engine.generate(prompt, new_tokens)  # warm-up
        runs = [engine.generate(prompt, new_tokens) for _ in range(repeats)]
        tps = sorted(r.tokens_per_second for r in runs)[len(runs) // 2]
        rows.append(
            {
                "sparsity": p,
                "tokens_per_second": round(tps, 2),
                "compile_seconds": round(compile_s, 2),
                "tokens": runs[-1].tokens.tolist(),
                "prompt": prompt[0].tolist(),
            }
        )
    model.clear_sparsity()
    return rows
