"""Probe heads on a frozen encoder, and a bank that trains one head per learning rate at once.

* :class:`LinearProbe` — BatchNorm1d without affine, then a linear classifier, on the last
  block's (final-norm) token average ``[B, D]``.
* :class:`AttentiveProbe` — AIM-style attention pooling over the tokens ``[B, N, D]`` (the mean
  of the last 6 blocks' outputs, no final norm): BatchNorm1d without affine over every token,
  one learned query, multi-head attention with K/V projections without bias, linear classifier.
* :class:`ProbeBank` — one head per learning rate, all fed the same batches in one pass (the
  features are computed once), each with its own AdamW parameter group, cosine schedule and
  gradient clipping; :meth:`ProbeBank.top1` scores every head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PROBES = ("linear", "attentive")


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x_BD))


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int = 16):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        for w in (self.query, self.k.weight, self.v.weight):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Same function as attention of the one query over ``k(x)``, ``v(x)`` (see :meth:`reference`),
        computed without projecting every token: with one query, ``q·(W_k x) = (W_kᵀ q)·x`` and
        ``Σ a·(W_v x) = W_v (Σ a·x)``, so the per-token cost is ``H·D`` instead of ``2·D²``."""
        B, N, D = x_BND.shape
        H, d = self.num_heads, D // self.num_heads
        x = self.norm(x_BND.transpose(1, 2)).transpose(1, 2)  # statistics over batch and tokens, per channel
        wk, wv = self.k.weight.view(H, d, D), self.v.weight.view(H, d, D)
        u_HD = torch.einsum("hj,hjd->hd", self.query.view(H, d), wk) * d ** -0.5
        attn_BHN = torch.einsum("bnd,hd->bhn", x, u_HD).softmax(dim=-1)
        pooled_BHD = torch.einsum("bhn,bnd->bhd", attn_BHN, x)
        out_BHd = torch.einsum("bhd,hjd->bhj", pooled_BHD, wv)
        return self.linear(out_BHd.reshape(B, D))

    def reference(self, x_BND: torch.Tensor) -> torch.Tensor:
        """The textbook computation (keys and values for every token), for tests."""
        B, N, D = x_BND.shape
        H = self.num_heads
        x = self.norm(x_BND.transpose(1, 2)).transpose(1, 2)
        q = self.query.expand(B, 1, D).reshape(B, 1, H, D // H).transpose(1, 2)  # [B, H, 1, D/H]
        k = self.k(x).reshape(B, N, H, D // H).transpose(1, 2)
        v = self.v(x).reshape(B, N, H, D // H).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, D)
        return self.linear(pooled)


def make_probe(kind: str, dim: int, num_classes: int, num_heads: int = 16) -> nn.Module:
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    if kind == "attentive":
        return AttentiveProbe(dim, num_classes, num_heads)
    raise ValueError(f"unknown probe {kind!r}; expected one of {', '.join(PROBES)}")


class ProbeBank(nn.Module):
    """One probe per learning rate, trained side by side on the same batches.

    The learning rate of head ``i`` follows ``lrs[i]`` down a cosine to ``min_lr`` over
    ``total_steps`` (after ``warmup_steps`` of linear warmup); gradients are clipped per head.
    """

    def __init__(self, kind: str, dim: int, num_classes: int, lrs: list[float], *, total_steps: int,
                 weight_decay: float = 0.05, min_lr: float = 0.0, warmup_steps: int = 0, clip: float = 0.0,
                 num_heads: int = 16, betas=(0.9, 0.999)):
        super().__init__()
        if not lrs:
            raise ValueError("ProbeBank needs at least one learning rate")
        self.kind, self.lrs = kind, [float(x) for x in lrs]
        self.heads = nn.ModuleList(make_probe(kind, dim, num_classes, num_heads) for _ in self.lrs)
        self.total_steps, self.warmup_steps, self.min_lr, self.clip = max(1, total_steps), warmup_steps, min_lr, clip
        groups = []
        for head, lr in zip(self.heads, self.lrs, strict=False):
            decay = [p for n, p in head.named_parameters() if p.ndim > 1 and n != "query"]
            rest = [p for n, p in head.named_parameters() if not (p.ndim > 1 and n != "query")]
            groups += [{"params": decay, "weight_decay": weight_decay, "peak": lr},
                       {"params": rest, "weight_decay": 0.0, "peak": lr}]
        self.opt = torch.optim.AdamW(groups, lr=self.lrs[0], betas=betas)
        self.step_count = 0

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * t))

    def train_step(self, x: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every head on the batch; returns the per-head losses ``[H]``."""
        self.train()
        f = self.lr_factor(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = self.min_lr + (g["peak"] - self.min_lr) * f
        losses = torch.stack([F.cross_entropy(head(x), y_B) for head in self.heads])
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # heads share no parameters: each gets only its own loss's gradient
        if self.clip:
            for head in self.heads:
                torch.nn.utils.clip_grad_norm_(head.parameters(), self.clip)
        self.opt.step()
        self.step_count += 1
        return losses.detach()

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        """Correct top-1 predictions per head on a batch ``[H]``."""
        self.eval()
        return torch.stack([(head(x).argmax(-1) == y_B).sum() for head in self.heads])


def best_of(correct_H: torch.Tensor, n: int, lrs: list[float]) -> dict:
    """Top-1 per learning rate from correct counts ``[H]`` over ``n`` images, and the best."""
    top1 = (correct_H / max(1, n)).tolist()
    best = max(range(len(lrs)), key=lambda i: top1[i])
    return {"top1": top1[best], "lr": lrs[best], "per_lr": {f"{lr:g}": t for lr, t in zip(lrs, top1, strict=False)}}
