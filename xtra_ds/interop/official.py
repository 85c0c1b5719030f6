"""Official XTRA checkpoints in, timm-layout encoder weights out.

This model's parameter names *are* the official layout (``enc.*``, ``proj.*``, ``predictor.*``,
``aim_proj.*``; position embeddings in raster order), so loading is a key check plus
``load_state_dict``. The exported encoder loads into timm, strictly::

    timm.create_model("vit_huge_patch14_224", class_token=False, global_pool="avg", fc_norm=False,
                      num_classes=0).load_state_dict(safetensors.torch.load_file("enc.safetensors"))

(``fc_norm=False`` keeps timm's final norm on the tokens before pooling, as in XTRA.) timm's ViT
attends *bidirectionally*: loaded as above it computes other features than the encoder, which was
trained block-causally. :func:`timm_attention_mask` gives the mask to pass where timm takes one
(``forward_features(x, attn_mask=…)`` in recent timm).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.tokens import block_of_patch
from ..models.xtra import XTRA, XTRAEncoder, XTRASizes


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint (Lightning ``state_dict`` or DeepSpeed
    ``module``) or a plain state dict / safetensors file. Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint — truncated or not a checkpoint? "
                              f"({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = obj["module"]  # DeepSpeed mp_rank_00_model_states.pt
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict, a Lightning checkpoint ('state_dict') or a "
                              f"DeepSpeed model-states file ('module')")
    return {_strip(k): v for k, v in obj.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _describe_mismatch(missing: list[str], unexpected: list[str], shape: list[str]) -> str:
    def few(keys):
        return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shape:
        parts.append(f"shape mismatches: {few(shape)}")
    return "; ".join(parts)


def load_state_dict_checked(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with one clear error listing every problem."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(sd)) if own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: "
                              + _describe_mismatch(missing, unexpected, shape)
                              + ". Is the --model (variant, patch size, image size) the one it was trained with?")
    module.load_state_dict(sd, strict=True)


def load_official(model: XTRA, path: str | Path) -> XTRA:
    """Load an official XTRA checkpoint (``*.ckpt`` or ``mp_rank_00_model_states.pt``) into ``model``."""
    load_state_dict_checked(model, read_checkpoint(path), str(path))
    return model


def timm_attention_mask(sizes: XTRASizes) -> torch.Tensor:
    """The encoder's block-causal mask in timm's (raster) token order: ``[N, N]`` bool, True = may attend
    (the convention of ``F.scaled_dot_product_attention``). Token q sees token j iff j's block comes
    no later than q's, blocks of k×k patches numbered in raster order."""
    block = block_of_patch(sizes.grid, sizes.block_size)  # [N]
    return block.unsqueeze(0) <= block.unsqueeze(1)


def encoder_to_timm(encoder: XTRAEncoder) -> dict[str, torch.Tensor]:
    """Encoder weights under timm VisionTransformer keys (they coincide; the copy is detached)."""
    return {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}


def encoder_from_any(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder keys from a full XTRA state dict (``enc.`` prefix) or an encoder-only one."""
    if any(k.startswith("enc.") for k in sd):
        return {k[len("enc."):]: v for k, v in sd.items() if k.startswith("enc.")}
    return sd


def export_encoder(encoder: XTRAEncoder, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the encoder as safetensors in timm's ViT layout (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(encoder_to_timm(encoder), str(tmp), metadata=metadata or {})
    tmp.replace(path)
