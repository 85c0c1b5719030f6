"""Analytic FLOP counts of the XTRA forward pass (pure functions; MFU uses them).

Counted as torch.utils.flop_counter does: 2·m·n·k per matmul (linear layers, the patch
convolution) and 4·N²·d per attention (QKᵀ and AV); norms, activations and softmax are not
counted. A training step is ≈ 3× forward (activation recomputation is not counted in MFU).
"""

from __future__ import annotations

from ..models.xtra import XTRASizes


def _attention_flops(n: int, dim: int, depth: int) -> int:
    return depth * 4 * n * n * dim  # QKᵀ and AV


def _trunk_flops(n: int, dim: int, depth: int, mlp_hidden: int) -> int:
    return depth * 2 * n * dim * (3 * dim + dim + 2 * mlp_hidden) + _attention_flops(n, dim, depth)


def attention_flops(s: XTRASizes) -> int:
    """The attention products' part of :func:`forward_flops` (encoder and predictor), per image."""
    n = s.num_tokens
    return _attention_flops(n, s.dim, s.depth) + _attention_flops(n, s.pred_width, s.pred_depth)


def forward_flops(s: XTRASizes) -> dict[str, int]:
    """Forward FLOPs per image, by part and in total."""
    n = s.num_tokens
    enc = 2 * n * s.in_chans * s.patch_size ** 2 * s.dim + _trunk_flops(n, s.dim, s.depth, int(s.dim * s.mlp_ratio))
    proj = 2 * n * (s.dim * s.proj_hidden + s.proj_hidden * s.pred_width)
    pred = _trunk_flops(n, s.pred_width, s.pred_depth, 4 * s.pred_width)
    head_in = s.block_tokens * s.pred_width
    head = s.heads_ahead * 2 * s.num_blocks * (head_in * s.head_hidden + s.head_hidden * s.block_pixels)
    return {"encoder": enc, "projection": proj, "predictor": pred, "pixel_head": head,
            "total": enc + proj + pred + head}


def train_flops_per_image(s: XTRASizes) -> int:
    """Model FLOPs of one training step per image: forward + backward (2× forward)."""
    return 3 * forward_flops(s)["total"]


# Dense bf16 peak of common accelerators (no sparsity), FLOP/s; MFU is omitted elsewhere.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "GH200": 989e12}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a device name as CUDA reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name.upper().replace("NVIDIA ", ""):
            return value
    return None


def mfu(images_per_sec: float, s: XTRASizes, peak: float) -> float:
    return images_per_sec * train_flops_per_image(s) / peak
