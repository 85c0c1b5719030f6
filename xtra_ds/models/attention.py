"""Attention kernels, chosen by name (``model.attention``) and passed into every transformer block.

A kernel is ``fn(q, k, v, mask) -> out`` on ``[B, H, N, hd]`` tensors, where ``mask`` says which
keys each query may see: :class:`BlockCausal` (XTRA's pattern, in block-major token order) or
``None`` (bidirectional, e.g. features for a bidirectional probe). The blocks never look inside
the mask; each kernel turns it into what its implementation wants:

* ``sdpa`` — ``F.scaled_dot_product_attention`` with the dense boolean ``[N, N]`` mask (made once
  per device). Runs everywhere; the default.
* ``flex`` — ``torch.compile``'d ``flex_attention`` with a block-sparse ``BlockMask``: tiles above
  the block diagonal are skipped, not masked (about half the attention FLOPs at 16 blocks). Needs a
  torch with ``torch.nn.attention.flex_attention``; head dims that are not a power of two (H/14: 80)
  are zero-padded.
* ``sdpa_cudnn``, ``sdpa_efficient`` — SDPA with the dense mask and one backend forced (GPUs).

Further kernels can be registered (:func:`register_attention`), e.g. by a benchmark. :func:`kernel_errors`
and :func:`require_close` check a kernel against fp32 SDPA with the dense mask (tests/test_gpu.py for every
kernel, bench/bench_gpu.py before it times one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .xtra import XTRASizes

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "BlockCausal | None"], torch.Tensor]


@dataclass(frozen=True)
class BlockCausal:
    """Tokens in blocks of ``block_tokens`` consecutive positions; a query may attend to a key iff
    block(key) <= block(query): bidirectional inside a block, causal across blocks."""

    num_blocks: int
    block_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[N, N]`` bool, True = may attend; made once per device."""
        return _dense_mask(self.num_blocks, self.block_tokens, torch.device(device))


@functools.lru_cache(maxsize=None)
def _dense_mask(num_blocks: int, block_tokens: int, device: torch.device) -> torch.Tensor:
    blk = torch.arange(num_blocks, device="cpu").repeat_interleave(block_tokens)  # CPU whatever the default device
    return (blk.unsqueeze(0) <= blk.unsqueeze(1)).to(device)


def sdpa(q, k, v, mask: BlockCausal | None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.dense(q.device))


def _forced_sdpa(backend_name: str) -> Kernel:
    def kernel(q, k, v, mask: BlockCausal | None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return sdpa(q, k, v, mask)
    return kernel


class FlexAttention:
    """``flex_attention`` (compiled once per model) with the block-causal pattern as a BlockMask."""

    def __init__(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        self._flex = torch.compile(flex_attention)
        self._masks: dict = {}

    def block_mask(self, mask: BlockCausal, device: torch.device):
        key = (mask, str(device))
        if key not in self._masks:
            bt = mask.block_tokens

            def block_causal(b, h, q_idx, kv_idx):
                return kv_idx // bt <= q_idx // bt
            self._masks[key] = self._create_block_mask(block_causal, None, None, mask.num_tokens, mask.num_tokens,
                                                       device=device)
        return self._masks[key]

    def __call__(self, q, k, v, mask: BlockCausal | None):
        block_mask = None if mask is None else self.block_mask(mask, q.device)
        hd = q.shape[-1]
        if hd & (hd - 1):  # flex's kernels want a power-of-two head dim: pad with zeros, keep hd's scale
            padded = 1 << (hd - 1).bit_length()
            q, k, v = (F.pad(t, (0, padded - hd)) for t in (q, k, v))
            return self._flex(q, k, v, block_mask=block_mask, scale=hd ** -0.5)[..., :hd]
        return self._flex(q, k, v, block_mask=block_mask)


# name -> factory of a kernel (called once per model, so that per-model caches stay per model)
_KERNELS: dict[str, Callable[[], Kernel]] = {
    "sdpa": lambda: sdpa,
    "flex": FlexAttention,
    "sdpa_cudnn": lambda: _forced_sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": lambda: _forced_sdpa("EFFICIENT_ATTENTION"),
}


def attention_names() -> list[str]:
    return list(_KERNELS)


def register_attention(name: str, factory: Callable[[], Kernel]) -> None:
    """Make ``factory()`` available as ``model.attention=name`` (e.g. a benchmark's own variant)."""
    _KERNELS[name] = factory


def attention_kernel(name: str) -> Kernel:
    """A fresh kernel of the registered ``name``."""
    if name not in _KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; known: {', '.join(_KERNELS)}")
    return _KERNELS[name]()


# --- checking a kernel ---------------------------------------------------------------------------

def kernel_errors(fn: Kernel, sizes: XTRASizes, batch: int, device: torch.device, grad: bool) -> dict[str, float]:
    """Max abs error of kernel ``fn`` against fp32 SDPA with the dense block-causal mask, at the encoder's
    attention shape (``sizes``) on random tensors: ``out_err`` (and ``grad_err``, of q, k and v, with
    ``grad``), next to the error of the project's own path — SDPA with the mask in the same dtype — as
    ``sdpa_out_err`` (``sdpa_grad_err``). The inputs are bf16 on a GPU, fp32 elsewhere.

    q, k, v are strided views of one qkv tensor, as ``xtra_ds.models.layers.Attention`` makes them, so that a
    compiled kernel is compiled here for the layout the model uses.
    """
    B, H, N, hd = batch, sizes.num_heads, sizes.num_tokens, sizes.dim // sizes.num_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3, H, hd, device=device, dtype=dtype, generator=g)
    dout = torch.randn(B, H, N, hd, device=device, dtype=dtype, generator=g)
    mask = BlockCausal(sizes.num_blocks, sizes.block_tokens)

    def run(f, x):
        x = x.detach().clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = f(*x.permute(2, 0, 3, 1, 4).unbind(0), mask)  # each [B, H, N, hd]
        if grad:
            out.backward(dout.to(out.dtype))
        return out.detach().float(), (x.grad.float() if grad else None)

    ref, ref_grad = run(sdpa, qkv.float())
    errors = {}
    for prefix, f in (("", fn), ("sdpa_", sdpa)):
        out, grad_ = run(f, qkv)
        errors[f"{prefix}out_err"] = float((out - ref).abs().max())
        if grad:
            errors[f"{prefix}grad_err"] = float((grad_ - ref_grad).abs().max())
    return errors


def require_close(name: str, errors: dict[str, float]) -> None:
    """Raise unless kernel ``name`` (its :func:`kernel_errors`) is as close to fp32 as the project's own path
    (within 4x, + 1e-3): otherwise it computes something other than block-causal attention."""
    for what in ("out", "grad"):
        err, base = errors.get(f"{what}_err"), errors.get(f"sdpa_{what}_err")
        if err is not None and not err <= 4 * base + 1e-3:
            raise RuntimeError(f"attention variant {name}: {what} differs from fp32 SDPA with the dense mask by "
                               f"{err:.3g}, the project's path by {base:.3g}")


class AttentionHealth:
    """Each attention layer's largest logit and mean entropy on one batch — what grows until very large ViTs
    diverge, and what SDPA's fused kernels never show. Used as ``with AttentionHealth(model) as health:
    model(x)``: for that forward every block's kernel computes its logits explicitly (``q·kᵀ/√d`` in fp32, the
    mask applied; the same output), and ``health.stats`` then maps ``"enc.03"``/``"pred.01"`` to
    ``(max_logit, mean_entropy)``. The model's kernels are restored when the block ends."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.stats, self._saved = model, {}, []

    def __enter__(self) -> AttentionHealth:
        for trunk, tag in ((self.model.enc, "enc"), (self.model.predictor, "pred")):
            for i, block in enumerate(trunk.blocks):
                self._saved.append((block.attn, block.attn.kernel))
                block.attn.kernel = self._recording(f"{tag}.{i:02d}")
        return self

    def __exit__(self, *exc) -> None:
        for attn, kernel in self._saved:
            attn.kernel = kernel
        self._saved = []
        if self.stats:  # one host synchronisation for every layer's figures
            names, values = list(self.stats), torch.stack([torch.stack(v) for v in self.stats.values()]).tolist()
            self.stats = {n: (a, b) for n, (a, b) in zip(names, values, strict=True)}

    def _recording(self, name: str) -> Kernel:
        def kernel(q, k, v, mask: BlockCausal | None):
            logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, N, N]
            if mask is not None:
                logits = logits.masked_fill(~mask.dense(q.device), float("-inf"))
            probs = logits.softmax(-1)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()  # nats, mean over queries and heads
            self.stats[name] = (logits.detach().amax(), entropy.detach())
            return (probs @ v.float()).to(v.dtype)

        return kernel
