"""Transformer building blocks shared by the XTRA encoder and predictor.

Attention is injected: each block gets an attention *kernel* (:mod:`.attention`, chosen by name)
and is told at ``forward`` which keys each query may see (a :class:`~.attention.BlockCausal`
pattern or ``None`` for bidirectional), so one block serves every use and every implementation.
Parameter names follow timm's ``VisionTransformer`` and the official XTRA layout.

Weights are initialised inside the constructor of the module that owns them (``reset_parameters``
of :class:`Linear` and :class:`PatchConv`, the position embedding in :class:`Trunk`), so the init
also holds under ``deepspeed.zero.Init``, which partitions a module's parameters as soon as its
constructor returns: an init applied from outside afterwards would touch empty partitions.
The random draws are made in fp32 whatever the parameter's dtype (:func:`init_fp32_`): under
``zero.Init`` with bf16 the parameters are created in bf16, where ``trunc_normal_`` rounds some of
its uniform draws to ±1, whose inverse error function is infinite — clamped to ±2, a hundred standard
deviations: XTRA-H/14 started with a loss of 20,000 instead of 8 on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import BlockCausal, Kernel, sdpa

INIT_STD = 0.02
LN_EPS = 1e-6


@torch.no_grad()
def init_fp32_(param: torch.Tensor, init_fn, **kwargs) -> torch.Tensor:
    """``init_fn(param, **kwargs)`` (an ``nn.init`` function) computed in fp32 and copied into ``param``
    whatever its dtype: the same random draws as on an fp32 tensor, rounded once at the end. (A copy by
    ``.float()``, not a new tensor: ``zero.Init`` makes every tensor *created* inside it bf16.)"""
    if param.dtype == torch.float32:
        return init_fn(param, **kwargs)
    draw = param.float()
    init_fn(draw, **kwargs)
    return param.copy_(draw)


class Linear(nn.Linear):
    """``nn.Linear`` with XTRA's init: trunc-normal(std .02) weight, zero bias."""

    def reset_parameters(self) -> None:
        init_fp32_(self.weight, nn.init.trunc_normal_, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PatchConv(nn.Conv2d):
    """The patch embedding's ``Conv2d`` with the reference's init: kaiming-normal weights (fan_in,
    ReLU gain: std √(2/fan_in), 0.051 for 3·16·16) and a zero bias."""

    def reset_parameters(self) -> None:
        init_fp32_(self.weight, nn.init.kaiming_normal_, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, kernel: Kernel = sdpa):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.kernel = kernel  # a plain attribute: not a module, holds no parameters
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor, mask: BlockCausal | None) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
        out = self.kernel(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float = 0.0, kernel: Kernel = sdpa):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, kernel)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: BlockCausal | None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Trunk(nn.Module):
    """Learned position embedding + a stack of blocks + final LayerNorm.

    The position embedding is stored in raster token order (as in official checkpoints) and
    gathered into the model's sequence order on each call, so checkpoints load unchanged.
    """

    def __init__(self, *, num_tokens: int, dim: int, depth: int, num_heads: int,
                 mlp_hidden: int, drop_path: float = 0.0, kernel: Kernel = sdpa):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        init_fp32_(self.pos_embed, nn.init.trunc_normal_, std=INIT_STD)
        rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_hidden, r, kernel) for r in rates)
        self.norm = layer_norm(dim)
        self.grad_checkpointing = False

    def forward(self, x_BND: torch.Tensor, token_index: torch.Tensor, mask: BlockCausal | None) -> torch.Tensor:
        """Add position embeddings (gathered into sequence order), run the blocks, normalise.

        Parameters are only touched inside their own module's ``forward``, which is what lets
        ZeRO-3 gather them just in time.
        """
        x, _ = self.run_blocks(x_BND + self.pos_embed.index_select(1, token_index), mask)
        return self.norm(x)

    def run_blocks(self, x: torch.Tensor, mask: BlockCausal | None, *,
                   collect: set[int] | None = None, stop: int | None = None):
        """Apply blocks ``[0, stop)``; return the final activations and those in ``collect``."""
        kept: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[:stop]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
            if collect and i in collect:
                kept[i] = x
        return x, kept
