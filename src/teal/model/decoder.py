"""The one decoder of this project: Llama 2/3, Mistral, Qwen2 and SmolLM.

Calibration, evaluation, generation and benchmarks all run this file.  It follows
gpt-fast's shape: a config, ``Transformer`` of ``Block``s, each an ``Attention`` and an
``MLP``, and a static ``KVCache``.  Two choices serve the sparse kernels:

* every projection weight is stored input-major (``wt``: ``[in, out]``) so that a
  zeroed input channel is a skipped contiguous row, and the dense path reads the same
  buffer (``x @ wt``);
* q/k/v and gate/up are fused into one buffer each, so a fused kernel reads one input
  once per decode step.

Decode (one token, ``input_pos`` given) has static shapes and no data-dependent Python
branches, so it can be compiled and captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teal.kernels import reference
from teal.kernels.dispatch import (
    SparseCall,
    decode_glue,
    fuses_glue,
    lm_head,
    load_decode_attention,
    project,
    project_gate_up,
)
from teal.model.config import ModelConfig, llama3_inv_freq_scale

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
# Which projections (indices into PROJECTIONS) read each site's input.
SITE_PROJECTIONS = {"attn_in": (0, 1, 2), "attn_out": (3,), "mlp_in": (4, 5), "mlp_mid": (6,)}

# Called as observer(layer, site, x, pos_mask) with each site's input before it is
# sparsified; used by calibration and by the measured-sparsity counter.
Observer = Callable[[int, str, Tensor, "Tensor | None"], None]


# Bumped whenever a block's modules get another tensor or submodule (a new cache,
# quantized weights, ``model.to``): native decode plans that point into those tensors
# (``teal.kernels.cpu``) check it instead of re-reading every attribute each step.
_LAYOUT = [0]


def layout_version() -> int:
    return _LAYOUT[0]


class _Tracked(nn.Module):
    """A module whose attribute assignments and conversions bump ``layout_version``."""

    def __setattr__(self, name: str, value) -> None:  # noqa: ANN001
        super().__setattr__(name, value)
        _LAYOUT[0] += 1

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        _LAYOUT[0] += 1
        return super()._apply(fn, recurse)


class RMSNorm(_Tracked):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, glue=None) -> Tensor:  # noqa: ANN001 (a DecodeGlue)
        if glue is not None:
            return glue.rms_norm(x, self.weight, self.eps)
        return reference.rms_norm(x, self.weight, self.eps)


class KVCache(_Tracked):
    """Preallocated keys and values ``[B, kv_heads, max_len, head_dim]``; writes go
    through ``index_copy_`` so the decode step has no shape that depends on position."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout; GGUF's interleaved
    layout is undone by the loader, so one convention holds everywhere."""
    return x * cos + _rotate_half(x) * sin


class Attention(_Tracked):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        hd = cfg.head_dim
        self.splits = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)
        self.wqkv = nn.Parameter(torch.empty(cfg.dim, sum(self.splits)))
        self.bqkv = nn.Parameter(torch.zeros(sum(self.splits))) if cfg.qkv_bias else None
        self.wo = nn.Parameter(torch.empty(cfg.n_heads * hd, cfg.dim))
        self.kv_cache: KVCache | None = None
        # Read in the compiled decode step instead of ``cfg.sliding_windows[self.layer]``:
        # torch.compile treats int attributes as constants, so reading the layer index
        # would compile the shared block once per layer.
        self.window = cfg.sliding_windows[layer]
        # One-token steps: RoPE, cache write and attention in one kernel (set by
        # ``Transformer.set_decode_attention``; None: the torch ops below).
        self.decode_kernel: Callable[..., Tensor] | None = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor,
        input_pos: Tensor | None,
        sparse: SparseCall | None,
        observer: Observer | None,
        glue=None,  # noqa: ANN001 (a cpu.DecodeGlue: native one-token attention)
        norm: tuple[Tensor, float] | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """``norm``, ``residual``: see ``dispatch.project`` (the block's glue, for backends
        that fuse it into the kernels)."""
        cfg = self.cfg
        bsz, seqlen, _ = x.shape
        if observer is not None:
            observer(self.layer, "attn_in", x, sparse.pos_mask if sparse else None)
        qkv = project(
            x, self.wqkv, self.bqkv, sparse, slice(0, 3), self.splits, "attn_in", norm=norm
        )
        if glue is not None and self.kv_cache is not None:
            cache, window = self.kv_cache, cfg.sliding_windows[self.layer]
            out = glue.attention(qkv, *rope, cache.k, cache.v, window, cfg.n_heads,
                                 cfg.n_kv_heads)  # fmt: skip
            return self._out(out, sparse, observer, residual)
        if (
            self.decode_kernel is not None
            and seqlen == 1
            and self.kv_cache is not None
            and input_pos is not None
        ):
            cache = self.kv_cache
            out = self.decode_kernel(qkv, *rope, cache.k, cache.v, input_pos, cfg.n_heads,
                                     cfg.n_kv_heads, self.window)  # fmt: skip
            return self._out(out, sparse, observer, residual)
        q, k, v = qkv.split(self.splits, dim=-1)
        q = q.view(bsz, seqlen, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=cfg.n_heads != cfg.n_kv_heads
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, cfg.n_heads * cfg.head_dim)
        return self._out(out, sparse, observer, residual)

    def _out(
        self,
        out: Tensor,
        sparse: SparseCall | None,
        observer: Observer | None,
        residual: Tensor | None = None,
    ) -> Tensor:
        if observer is not None:
            observer(self.layer, "attn_out", out, sparse.pos_mask if sparse else None)
        return project(
            out, self.wo, None, sparse, slice(3, 4), (self.cfg.dim,), "attn_out",
            residual=residual,
        )  # fmt: skip


class MLP(_Tracked):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.act = cfg.act
        self.w_gate_up = nn.Parameter(torch.empty(cfg.dim, 2 * cfg.ffn_dim))  # [gate | up]
        self.w_down = nn.Parameter(torch.empty(cfg.ffn_dim, cfg.dim))
        # The low-rank split of the gate|up input (``teal.model.lowrank``): U [dim, r] and
        # U^T W [r, 2 ffn], or None.
        self.register_buffer("lr_u", None, persistent=False)
        self.register_buffer("lr_uw", None, persistent=False)

    def set_lowrank(self, u: Tensor | None, uw: Tensor | None) -> None:
        self.lr_u, self.lr_uw = u, uw

    def forward(
        self,
        x: Tensor,
        sparse: SparseCall | None,
        observer: Observer | None,
        norm: tuple[Tensor, float] | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        pos_mask = sparse.pos_mask if sparse else None
        cats = sparse is not None and sparse.scales and "mlp_cats" in sparse.scales
        if self.lr_u is not None and (sparse is not None or observer is not None) and not cats:
            mid = self._split_gate_up(x, sparse, observer, norm)
        else:
            if observer is not None:
                observer(self.layer, "mlp_in", x, pos_mask)
            mid = project_gate_up(x, self.w_gate_up, sparse, self.act, norm=norm)
        if observer is not None:
            observer(self.layer, "mlp_mid", mid, pos_mask)
        dim = self.w_down.shape[1]
        return project(
            mid, self.w_down, None, sparse, slice(6, 7), (dim,), "mlp_mid", residual=residual
        )

    def _split_gate_up(
        self,
        x: Tensor,
        sparse: SparseCall | None,
        observer: Observer | None,
        norm: tuple[Tensor, float] | None,
    ) -> Tensor:
        """``act(gate) * up`` with the input split (``teal.model.lowrank``): the rank-r
        part ``(x U) (U^T W)`` dense, the remainder ``x - x U U^T`` sparsified (and
        observed) as the site's input.  The kernels see a plain gate|up projection."""
        if norm is not None:
            x = reference.rms_norm(x, *norm)
        z = x @ self.lr_u
        res = x - z @ self.lr_u.T
        if observer is not None:
            observer(self.layer, "mlp_in", res, sparse.pos_mask if sparse else None)
        ffn = self.w_gate_up.shape[1] // 2
        gu = project(res, self.w_gate_up, None, sparse, slice(4, 6), (ffn, ffn), "mlp_in")
        gu = (gu.float() + z.float() @ self.lr_uw.float()).to(x.dtype)
        gate, up = gu[..., :ffn].float(), gu[..., ffn:]
        return reference.gate_up_product(gate, up, self.act).to(x.dtype)


class Block(_Tracked):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, h, rope, mask, input_pos, sparse, observer, glue=None) -> Tensor:
        if glue is None and observer is None and fuses_glue(sparse):
            # The sparse kernels take both norms and both residual adds (the same ops and
            # roundings as below): three kernels fewer per block in a decode step.
            an, fn = self.attention_norm, self.ffn_norm
            h = self.attention(
                h, rope, mask, input_pos, sparse, None, norm=(an.weight, an.eps), residual=h
            )
            return self.mlp(h, sparse, None, norm=(fn.weight, fn.eps), residual=h)
        x = self.attention_norm(h, glue)
        h = h + self.attention(x, rope, mask, input_pos, sparse, observer, glue)
        return h + self.mlp(self.ffn_norm(h, glue), sparse, observer)


class Transformer(nn.Module):
    """A causal LM: ``model(input_ids)`` returns logits ``[B, T, vocab]``.

    Without ``input_pos`` the call is stateless (positions ``0..T-1``, no cache), which
    is what calibration and perplexity use.  With ``input_pos`` (after ``setup_cache``)
    keys and values go to the static cache: a prefill passes many positions, a decode
    step one.

    Sparsity (``set_sparsity``) holds one threshold per (layer, projection).  In mode
    ``"decode"`` only single-token steps are sparse (prefill stays dense, as in the
    method); in mode ``"all"`` every position is; ``sparse_mask`` overrides both per
    position (the decode-like perplexity protocol).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        )
        self.reset_buffers()
        self.sparse_mode = "off"
        self.sparse_backend = "torch"
        self.sparse_scales: list[dict[str, Tensor]] | None = None
        self.observer: Observer | None = None
        self.quant = None  # a teal.model.quant.QuantConfig once quantized
        # Compiled copies of the blocks for one-token steps, set by the CUDA engine.
        self.decode_blocks: list[Callable[..., Tensor]] | None = None
        self.cache_len = 0
        # Set by the loader: tokenizer, where the weights came from.
        self.tokenizer = None
        self.source: str | None = None
        self.fingerprint: str | None = None
        # The rotation of each KV head's values the weights carry relative to the
        # checkpoint (``teal.model.rotate``; None: none).
        self.value_bases: Tensor | None = None
        # The low-rank split of each MLP input (``teal.model.lowrank``; None: none).
        self.lowrank_bases: Tensor | None = None

    def reset_buffers(self) -> None:
        """(Re)make the fp32 buffers: RoPE frequencies and the threshold table.  Called
        after the model is materialised from the meta device or cast to another dtype."""
        cfg = self.config
        device = self.tok_embeddings.weight.device
        # Same arithmetic as the reference (fp32 powers of the base) so RoPE angles agree.
        exps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float()
        exps = exps / cfg.head_dim
        inv_freq = (1.0 / cfg.rope_theta**exps).tolist()
        if cfg.rope_scaling is not None:
            kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
            if kind == "llama3":
                inv_freq = llama3_inv_freq_scale(inv_freq, cfg.rope_scaling)
            elif kind == "linear":
                inv_freq = [f / float(cfg.rope_scaling["factor"]) for f in inv_freq]
        self.register_buffer(
            "inv_freq", torch.tensor(inv_freq, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "thresholds",
            torch.zeros(cfg.n_layers, len(PROJECTIONS), device=device),
            persistent=False,
        )
        # Thresholds that keep every channel: a dense one-token step on the CPU backend
        # runs the native step with these (one buffer, so its cached plans stay valid).
        self.register_buffer(
            "keep_all",
            torch.full((cfg.n_layers, len(PROJECTIONS)), -torch.inf, device=device),
            persistent=False,
        )

    # ----- sparsity -------------------------------------------------------------
    def set_sparsity(
        self,
        thresholds: Tensor,
        mode: str = "decode",
        scales: list[dict[str, Tensor]] | None = None,
    ) -> None:
        """Turn sparsity on: ``thresholds`` is ``[n_layers, 7]`` (q, k, v, o, gate, up,
        down); ``scales`` optional per-layer, per-site channel scales for the score
        ``|x| * s`` (weight-informed methods)."""
        if mode not in ("decode", "all"):
            raise ValueError(f"sparse mode must be 'decode' or 'all', not {mode!r}")
        shape = (self.config.n_layers, len(PROJECTIONS))
        if tuple(thresholds.shape) != shape:
            raise ValueError(f"thresholds must have shape {shape}, got {tuple(thresholds.shape)}")
        # Copy in place: a compiled or graph-captured decode step keeps reading this buffer.
        self.thresholds.copy_(thresholds.to(self.thresholds.device, torch.float32))
        self.sparse_scales = scales
        self.sparse_mode = mode

    def clear_sparsity(self) -> None:
        self.sparse_mode = "off"
        self.sparse_scales = None

    def set_decode_attention(self, backend: str | None) -> None:
        """``"triton"``: one-token steps with a KV cache run RoPE, the cache write and
        attention as one kernel (``kernels/triton_attention.py``; the CUDA engine sets
        this); ``None``: the torch ops (RoPE, ``index_copy_``, SDPA)."""
        fn = None if backend is None else load_decode_attention(backend)
        for block in self.layers:
            block.attention.decode_kernel = fn

    def set_backend(self, backend: str) -> None:
        """Which implementation runs sparse decode steps: ``torch`` (reference),
        ``cpu`` (gather kernel) or ``triton`` (GPU)."""
        from teal.kernels.dispatch import BACKENDS, load_backend

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
        if backend != "torch":
            load_backend(backend)  # import now: a compiled step cannot run the import
        if backend == "cpu":
            from teal.kernels.cpu import place_weights

            place_weights(self)  # weights on huge pages: fewer TLB misses per kept row
        self.sparse_backend = backend

    def quantize(self, fmt: str, group_size: int = 128, zero_point: bool | str = True,
                 lm_head: bool = True, hessians: dict | None = None):  # fmt: skip
        """Weight-only int8 / int4 projections (and ``lm_head``), in place, or ``"gguf"``:
        the GGUF file's own Q4_0 / Q4_1 weights; see ``teal.model.quant``
        (``hessians``: GPTQ rounding, ``teal.model.gptq``).  Returns the ``QuantConfig``."""
        from teal.model.quant import quantize_model

        return quantize_model(self, fmt, group_size, zero_point, lm_head, hessians)

    # ----- cache ----------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int) -> None:
        cfg = self.config
        if max_len > cfg.max_seq_len:
            from teal.errors import ContextLengthError

            raise ContextLengthError(
                f"{max_len} positions exceed the model's context of {cfg.max_seq_len} tokens:"
                " shorten the prompt or ask for fewer new tokens"
            )
        p = self.tok_embeddings.weight
        for block in self.layers:
            block.attention.kv_cache = KVCache(
                batch, cfg.n_kv_heads, max_len, cfg.head_dim, p.dtype, p.device
            )
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attention.kv_cache = None
        self.cache_len = 0

    # ----- forward --------------------------------------------------------------
    def _mask(self, q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
        mask = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
        return mask

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor | None = None,
        *,
        sparse_mask: Tensor | None = None,
    ) -> Tensor:
        bsz, seqlen = input_ids.shape
        device = input_ids.device
        if input_pos is None:
            q_pos = torch.arange(seqlen, device=device)
            k_pos = q_pos
        else:
            q_pos = input_pos
            k_pos = torch.arange(self.cache_len, device=device)
        h = self.tok_embeddings(input_ids)
        # Native one-token glue (norms, attention) on the CPU backend; it needs no mask.
        glue = None
        if input_pos is not None and seqlen == 1 and self.cache_len:
            glue = decode_glue(self.sparse_backend, h, input_pos)
        windows = set(self.config.sliding_windows)
        masks = {w: None if glue else self._mask(q_pos, k_pos, w) for w in windows}
        freqs = q_pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope = (emb.cos().to(h.dtype), emb.sin().to(h.dtype))
        sparse = self._sparse_call(seqlen, sparse_mask)
        blocks = self.layers
        if self.decode_blocks is not None and seqlen == 1 and self.observer is None:
            blocks = self.decode_blocks
        if glue is not None and sparse_mask is None and self.observer is None:
            # The CPU backend runs every block of a one-token step in one native call,
            # the same ops as Block.forward with the same roundings (None where some
            # block cannot: quantized weights, CATS).  A dense step keeps every channel:
            # the native walk over all rows streams at twice the speed of torch's
            # one-row matmul here.
            if sparse is not None:
                thr, scales = self.thresholds, self.sparse_scales
            else:
                thr, scales = self.keep_all, None
            fused = glue.blocks(blocks, h, *rope, thr, scales)
            if fused is not None:
                blocks, h = (), fused
        for i, block in enumerate(blocks):
            call = None
            if sparse is not None:
                scales = self.sparse_scales[i] if self.sparse_scales else None
                call = SparseCall(self.thresholds[i], sparse.pos_mask, scales, sparse.backend)
            window = self.config.sliding_windows[i]
            h = block(h, rope, masks[window], input_pos, call, self.observer, glue)
        h = self.norm(h, glue)
        head = self.tok_embeddings.weight if self.lm_head is None else self.lm_head
        return lm_head(h, head, self.sparse_backend)

    def _sparse_call(self, seqlen: int, sparse_mask: Tensor | None) -> SparseCall | None:
        if self.sparse_mode == "off":
            return None
        if sparse_mask is not None:
            return SparseCall(self.thresholds[0], sparse_mask, None, "torch")
        if self.sparse_mode == "decode" and seqlen != 1:
            return None  # prefill stays dense
        backend = self.sparse_backend
        return SparseCall(self.thresholds[0], None, None, backend)

    # ----- conveniences ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def generate(self, prompt, **kwargs):  # noqa: ANN001, ANN201 (see teal.generate)
        """Generate text; arguments as ``teal.generate.generate``."""
        from teal.generate import generate

        return generate(self, prompt, **kwargs)
