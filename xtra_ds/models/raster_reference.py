"""A deliberately plain, raster-order implementation of the XTRA forward pass and loss.

It works on a state dict in the *official* key layout and follows the paper's definition
literally: tokens in raster order, the block-causal mask built from each patch's block index,
a block's predictor outputs and pixel targets gathered with ``F.unfold``. It is the oracle the
tests compare :class:`xtra_ds.models.XTRA` against, and the baseline of ``bench/bench_model.py``.
Nothing in training uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .xtra import XTRASizes


def _block(sd: dict, pre: str, x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-6)
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-2, -1)) / (D // heads) ** 0.5
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(B, N, D), sd[pre + "attn.proj.weight"],
                     sd[pre + "attn.proj.bias"])
    h = F.layer_norm(x, (D,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-6)
    h = F.gelu(F.linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + F.linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def raster_mask(s: XTRASizes) -> torch.Tensor:
    """Block-causal mask in raster token order: q may attend to key j iff block(j) <= block(q)."""
    gh, gw = s.grid
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    blk = ((r // s.block_size) * (gw // s.block_size) + c // s.block_size).flatten()
    return blk[None, :] <= blk[:, None]


def _trunk(sd, pre, x, mask, depth, heads):
    for i in range(depth):
        x = _block(sd, f"{pre}blocks.{i}.", x, mask, heads)
    return F.layer_norm(x, (x.shape[-1],), sd[pre + "norm.weight"], sd[pre + "norm.bias"], 1e-6)


def raster_forward(sd: dict, s: XTRASizes, images: torch.Tensor, mask: torch.Tensor | None = None):
    """Predictions ``[B, nb, P]`` per head and targets ``[B, nb, P]``, blocks in raster order."""
    mask = raster_mask(s) if mask is None else mask
    x = F.conv2d(images, sd["enc.patch_embed.proj.weight"], sd["enc.patch_embed.proj.bias"], stride=s.patch_size)
    x = x.flatten(2).transpose(1, 2) + sd["enc.pos_embed"]
    x = _trunk(sd, "enc.", x, mask, s.depth, s.num_heads)
    x = F.linear(F.gelu(F.linear(x, sd["proj.mlp.0.weight"], sd["proj.mlp.0.bias"])), sd["proj.mlp.2.weight"])
    x = _trunk(sd, "predictor.", x + sd["predictor.pos_embed"], mask, s.pred_depth, s.pred_heads)
    B, N, w = x.shape
    gh, gw = s.grid
    # [B, w·k², nb]: unfold orders each column as (feature, row, col) — the feature-major layout.
    gathered = F.unfold(x.transpose(1, 2).reshape(B, w, gh, gw), s.block_size, stride=s.block_size).transpose(1, 2)
    preds = []
    for j in range(s.heads_ahead):
        pre = f"aim_proj.{j}.mlp."
        h = F.gelu(F.linear(gathered, sd[pre + "0.weight"], sd[pre + "0.bias"]))
        preds.append(F.linear(h, sd[pre + "2.weight"], sd[pre + "2.bias"]))
    bp = s.patch_size * s.block_size
    t = F.unfold(images, bp, stride=bp).transpose(1, 2)  # [B, nb, C·bp²], (channel, row, col)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    return preds, t


def raster_loss(sd: dict, s: XTRASizes, images: torch.Tensor, l1: bool = False) -> torch.Tensor:
    preds, t = raster_forward(sd, s, images)
    nb = t.shape[1]
    fn = F.l1_loss if l1 else F.mse_loss
    return torch.stack([fn(p[:, : nb - 1 - j], t[:, 1 + j:]) for j, p in enumerate(preds)]).mean()
