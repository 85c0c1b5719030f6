"""The XTRA model: block-causal ViT encoder, projection, block-causal predictor, pixel head(s).

Module names reproduce the official checkpoint layout (``enc.*``, ``proj.mlp.*``,
``predictor.*``, ``aim_proj.{j}.mlp.*``), so an official state dict loads with
``load_state_dict`` as it is; see :mod:`xtra_ds.interop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .attention import BlockCausal, Kernel, attention_kernel
from .layers import Linear, PatchConv, Trunk
from .tokens import block_orders, block_token_index, image_blocks, normalize_blocks


@dataclass(frozen=True)
class XTRASizes:
    """Everything that fixes the shapes of an XTRA model."""

    img_size: int = 224
    patch_size: int = 16
    block_size: int = 4  # k: a block is k×k patches
    in_chans: int = 3
    dim: int = 192  # encoder width
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    proj_hidden: int = 768  # projection MLP d -> proj_hidden -> pred_width
    pred_width: int = 192
    pred_depth: int = 8
    pred_heads: int = 3
    head_hidden: int = 1536  # pixel head: k²·pred_width -> head_hidden -> 3·(p·k)²
    heads_ahead: int = 1  # n pixel heads, head j predicts block i+1+j
    num_block_orders: int = 16  # pseudo-random block orders available to forward(order=...)

    def __post_init__(self):
        bp = self.patch_size * self.block_size
        if self.img_size % bp:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size × block_size = "
                f"{self.patch_size} × {self.block_size} = {bp}; use a multiple of {bp} "
                f"(e.g. {max(bp, self.img_size // bp * bp)})")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size,) * 2

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_tokens(self) -> int:
        return self.block_size ** 2

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_tokens

    @property
    def block_pixels(self) -> int:
        """Length of one block's pixel target: C·(p·k)²."""
        return self.in_chans * (self.patch_size * self.block_size) ** 2


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = PatchConv(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x = x_BCHW.to(self.proj.weight.dtype)  # fp32 images meet bf16 weights here, not before the targets
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], raster order


class XTRAEncoder(Trunk):
    """Pre-norm ViT without class token; attends block-causally by default.

    Keys follow timm's VisionTransformer (``patch_embed.proj``, ``pos_embed``, ``blocks.*``,
    ``norm``).
    """

    def __init__(self, s: XTRASizes, drop_path: float = 0.0, kernel: Kernel | str = "sdpa"):
        super().__init__(num_tokens=s.num_tokens, dim=s.dim, depth=s.depth, num_heads=s.num_heads,
                         mlp_hidden=int(s.dim * s.mlp_ratio), drop_path=drop_path,
                         kernel=attention_kernel(kernel) if isinstance(kernel, str) else kernel)
        self.sizes = s
        self.patch_embed = PatchEmbed(s.patch_size, s.in_chans, s.dim)
        self.mask = BlockCausal(s.num_blocks, s.block_tokens)  # the same pattern for every block order
        dev = self.pos_embed.device
        self.register_buffer("token_index", block_token_index(s.grid, s.block_size).to(dev), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.sizes.dim

    def tokens(self, images_BCHW: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Patch + position embedding, gathered into sequence order. ``[B, N, D]``."""
        idx = self.token_index if token_index is None else token_index
        x = self.patch_embed(images_BCHW) + self.pos_embed
        return x.index_select(1, idx)

    def forward(self, images_BCHW: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm token features in sequence order (block-major). ``[B, N, D]``."""
        x, _ = self.run_blocks(self.tokens(images_BCHW, token_index), self.mask)
        return self.norm(x)

    def forward_intermediates(self, images_BCHW: torch.Tensor, layers: int | list[int] = 1, *,
                              causal: bool = True, norm: bool = False, pool: str | None = None,
                              raster_order: bool = True) -> list[torch.Tensor]:
        """Outputs of chosen blocks, for probing.

        Args:
            layers: block indices (negative counts from the end), or an int n for the last n.
            causal: apply the block-causal mask (as in pre-training) or attend bidirectionally.
            norm: apply the final LayerNorm to each output.
            pool: None for tokens ``[B, N, D]``, ``"avg"`` for the token mean ``[B, D]``.
            raster_order: return tokens in raster patch order (else block-major order).
        """
        depth = len(self.blocks)
        idx = list(range(depth - layers, depth)) if isinstance(layers, int) else list(layers)
        if not idx or not all(-depth <= i < depth for i in idx):
            raise ValueError(f"layers={layers!r} does not select blocks of a depth-{depth} encoder")
        idx = [i % depth for i in idx]
        mask = self.mask if causal else None
        _, kept = self.run_blocks(self.tokens(images_BCHW), mask, collect=set(idx), stop=max(idx) + 1)
        outs = []
        for i in idx:
            x = self.norm(kept[i]) if norm else kept[i]
            if pool == "avg":
                x = x.mean(dim=1)
            elif pool is not None:
                raise ValueError(f"pool={pool!r}: expected None or 'avg'")
            elif raster_order:
                x = x[:, torch.argsort(self.token_index)]
            outs.append(x)
        return outs


class Projection(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(), Linear(hidden, out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PixelHead(nn.Module):
    """One MLP shared by all blocks: a block's gathered predictor outputs -> its pixels."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(), Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class XTRAOutput(NamedTuple):
    """A named tuple, so that DeepSpeed's ZeRO-3 hooks see the tensors inside (a dataclass hides them)."""

    preds: list[torch.Tensor]  # one per head, each [B, nb, C·(pk)²]; head j at block i predicts i+1+j
    targets: torch.Tensor  # [B, nb, C·(pk)²], normalised block pixels, in the same block order
    block_order: torch.Tensor  # [nb], raster index of the block at each sequence position


class XTRA(nn.Module):
    """The whole model. ``attention`` names the kernel every block uses (:mod:`.attention`)."""

    def __init__(self, sizes: XTRASizes, drop_path: float = 0.0, attention: str = "sdpa"):
        super().__init__()
        s = self.sizes = sizes
        kernel = attention_kernel(attention)  # one per model: encoder and predictor share its caches
        self.enc = XTRAEncoder(s, drop_path=drop_path, kernel=kernel)
        self.proj = Projection(s.dim, s.proj_hidden, s.pred_width)
        self.predictor = Trunk(num_tokens=s.num_tokens, dim=s.pred_width, depth=s.pred_depth,
                               num_heads=s.pred_heads, mlp_hidden=4 * s.pred_width, kernel=kernel)
        dev = self.enc.pos_embed.device
        self.aim_proj = nn.ModuleList(
            PixelHead(s.block_tokens * s.pred_width, s.head_hidden, s.block_pixels) for _ in range(s.heads_ahead))
        orders = block_orders(s.num_blocks, s.num_block_orders)
        self.register_buffer("block_orders", orders.to(dev), persistent=False)
        self.register_buffer("order_token_index",
                             torch.stack([block_token_index(s.grid, s.block_size, o) for o in orders]).to(dev),
                             persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.enc.grad_checkpointing = enable
        self.predictor.grad_checkpointing = enable

    def set_attention(self, attention: str | Kernel) -> None:
        """Give every block of encoder and predictor the attention kernel ``attention`` (a registered
        name or a kernel): the same function of the same weights, computed another way."""
        kernel = attention_kernel(attention) if isinstance(attention, str) else attention
        for block in (*self.enc.blocks, *self.predictor.blocks):
            block.attn.kernel = kernel

    def forward(self, images_BCHW: torch.Tensor, order: int | None = None) -> XTRAOutput:
        """Predict every block's successor(s).

        Args:
            images_BCHW: normalised images (ImageNet mean/std), ``[B, C, H, W]``.
            order: None for raster block order, or the index of one of the fixed pseudo-random
                block orders (``self.block_orders``).
        """
        s = self.sizes
        if order is None:
            tok_idx, blk_order = self.enc.token_index, None
        else:
            tok_idx, blk_order = self.order_token_index[order], self.block_orders[order]
        x = self.enc(images_BCHW, tok_idx)  # [B, N, D]
        x = self.proj(x)  # [B, N, w]
        x = self.predictor(x, tok_idx, self.enc.mask)  # [B, N, w]
        B = x.shape[0]
        # A block's k² outputs, feature-major (index d·k² + r·k + c), as the reference flattens.
        x = x.view(B, s.num_blocks, s.block_tokens, s.pred_width).transpose(2, 3).reshape(B, s.num_blocks, -1)
        preds = [head(x) for head in self.aim_proj]

        # Targets in fp32 whatever the compute dtype: the per-block variance needs the precision.
        targets = normalize_blocks(image_blocks(images_BCHW.float(), s.patch_size * s.block_size))
        if blk_order is not None:
            targets = targets.index_select(1, blk_order)
        else:
            blk_order = torch.arange(s.num_blocks, device=targets.device)
        return XTRAOutput(preds, targets, blk_order)


# --- named variants -------------------------------------------------------------------------

# Encoder sizes are the standard ViT ones. Projection / predictor / pixel-head sizes of base
# and huge are the paper's (DESIGN.md); tiny, small, large and giant are this project's choice,
# scaled between them.
VARIANTS: dict[str, dict] = {
    "tiny": dict(dim=192, depth=12, num_heads=3, proj_hidden=768, pred_width=192, pred_heads=3, head_hidden=1536),
    "small": dict(dim=384, depth=12, num_heads=6, proj_hidden=2048, pred_width=384, pred_heads=6, head_hidden=3072),
    "base": dict(dim=768, depth=12, num_heads=12, proj_hidden=4096, pred_width=768, pred_heads=6, head_hidden=6144),
    "large": dict(dim=1024, depth=24, num_heads=16, proj_hidden=4096, pred_width=768, pred_heads=6, head_hidden=6144),
    "huge": dict(dim=1280, depth=32, num_heads=16, proj_hidden=5120, pred_width=640, pred_heads=8, head_hidden=9408),
    "giant": dict(dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, proj_hidden=5632, pred_width=704,
                  pred_heads=8, head_hidden=9408),
}
# Paper resolutions: 256 px for /16 models, 224 px for /14 models.
DEFAULT_IMG_SIZE = {16: 256, 14: 224}


def model_names() -> list[str]:
    return [f"xtra_vit_{v}_patch{p}" for v in VARIANTS for p in (14, 16)]


def parse_model_name(name: str) -> tuple[str, int]:
    parts = name.split("_")
    if len(parts) != 4 or parts[:2] != ["xtra", "vit"] or parts[2] not in VARIANTS or not parts[3].startswith("patch"):
        import difflib
        hint = difflib.get_close_matches(name, model_names(), n=1)
        raise ValueError(f"unknown model {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" Known: {', '.join(model_names())}")
    return parts[2], int(parts[3][len("patch"):])


def model_sizes(name: str, **overrides) -> XTRASizes:
    """Sizes of a named variant (e.g. ``xtra_vit_huge_patch14``) with field overrides."""
    variant, patch = parse_model_name(name)
    fields = dict(VARIANTS[variant], patch_size=patch, img_size=DEFAULT_IMG_SIZE.get(patch, 224))
    unknown = set(overrides) - set(XTRASizes.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(XTRASizes.__dataclass_fields__)}")
    fields.update(overrides)
    return XTRASizes(**fields)


def create_model(name: str, *, drop_path: float = 0.0, grad_checkpointing: bool = False, attention: str = "sdpa",
                 **overrides) -> XTRA:
    """Build a named XTRA model, timm-style: ``create_model("xtra_vit_huge_patch14", block_size=2)``."""
    model = XTRA(model_sizes(name, **overrides), drop_path=drop_path, attention=attention)
    model.set_grad_checkpointing(grad_checkpointing)
    return model
