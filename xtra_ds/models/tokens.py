"""Token orders and images cut into blocks.

Vocabulary: the image is a ``gh × gw`` grid of ``p × p`` patches; a *block* is ``k × k`` patches;
blocks are numbered in raster order over the ``(gh/k) × (gw/k)`` block grid.

Inside the model tokens are kept *block-major*: the k² patches of the first block in the
current block order (row-major inside the block), then the next block, and so on. Attention
and MLPs are permutation-equivariant once position embeddings are gathered along, so this
equals the raster-order definition exactly, while (a) the block-causal mask becomes
block-lower-triangular with square k²×k² tiles (:class:`.attention.BlockCausal`) — one mask for
every block order — and (b) a block's k² token outputs are a contiguous slice, so gathering them
is a reshape.
"""

from __future__ import annotations

import torch

# Index tables are built on the CPU whatever the default device (e.g. under
# ``torch.device("meta")``); modules move them to their parameters' device.
CPU = torch.device("cpu")


def block_of_patch(grid: tuple[int, int], k: int) -> torch.Tensor:
    """Block index of every patch, in raster patch order. Returns ``[gh * gw]`` long."""
    gh, gw = grid
    rows = torch.arange(gh, device=CPU).unsqueeze(1) // k
    cols = torch.arange(gw, device=CPU).unsqueeze(0) // k
    return (rows * (gw // k) + cols).flatten()


def block_token_index(grid: tuple[int, int], k: int, block_order: torch.Tensor | None = None) -> torch.Tensor:
    """Raster patch indices in block-major sequence order. Returns ``[N]`` long.

    ``block_order`` is a permutation of the block indices (default: raster block order);
    the sequence visits the blocks in that order, each block's patches row-major.
    """
    gh, gw = grid
    bh, bw = gh // k, gw // k
    raster = torch.arange(gh * gw, device=CPU).view(bh, k, bw, k).permute(0, 2, 1, 3).reshape(bh * bw, k * k)
    if block_order is not None:
        raster = raster[block_order.to(CPU)]
    return raster.flatten()


def block_orders(num_blocks: int, num_orders: int = 16, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random block orders with distinct prefixes. Returns ``[num_orders, nb]``.

    The orders start with distinct blocks (so no two share a prefix) and visit the remaining
    blocks in a permutation drawn from a fixed seed: the same orders on every rank and run.
    ``num_orders`` is capped at ``num_blocks``, the number of distinct first blocks.
    """
    num_orders = min(num_orders, num_blocks)
    g = torch.Generator().manual_seed(seed)
    first = torch.randperm(num_blocks, generator=g, device=CPU)[:num_orders].tolist()
    orders = []
    for f in first:
        rest = [b for b in range(num_blocks) if b != f]
        perm = torch.randperm(len(rest), generator=g, device=CPU).tolist()
        orders.append([f] + [rest[i] for i in perm])
    return torch.tensor(orders, device=CPU)


def image_blocks(images_BCHW: torch.Tensor, block_px: int) -> torch.Tensor:
    """Cut images into blocks of ``block_px`` pixels, blocks in raster order.

    Returns ``[B, nb, C * block_px²]``, each block flattened as (channel, row, col).
    """
    B, C, H, W = images_BCHW.shape
    bh, bw = H // block_px, W // block_px
    x = images_BCHW.reshape(B, C, bh, block_px, bw, block_px)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, bh * bw, C * block_px * block_px)


def normalize_blocks(blocks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-block pixel normalisation over the last dim: (t - mean) / sqrt(var + eps), var unbiased."""
    mean = blocks.mean(dim=-1, keepdim=True)
    var = blocks.var(dim=-1, keepdim=True)  # unbiased, torch's default (as the reference)
    return (blocks - mean) / (var + eps).sqrt()
