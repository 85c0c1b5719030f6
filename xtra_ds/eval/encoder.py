"""Frozen encoders for probing, from wherever they live.

* an export folder of a run (``run_dir/exports/step_XXXXXXXX``, local or any fsspec URL):
  ``encoder.safetensors`` (timm layout) + ``meta.json`` (which carries the model's sizes);
* a weights file: an official XTRA checkpoint (``*.ckpt``, ``mp_rank_00_model_states.pt``),
  a consolidated state dict or an encoder ``.safetensors`` — the model name must be given;
* a ZeRO checkpoint folder of a run (``run_dir/checkpoints/step_XXXXXXXX``): its encoder is
  consolidated to a temporary file first; sizes come from the run's ``config.yaml``.

Whatever cannot be used raises :class:`ExportError` saying why — the eval worker records that
reason in its ledger and goes on with the next export.
"""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from ..interop import CheckpointError, consolidate, encoder_from_any, load_state_dict_checked, read_checkpoint
from ..models.xtra import XTRAEncoder, XTRASizes, model_sizes
from ..rundir import CONFIG, ENCODER_FILE, META_FILE, ExportMeta, step_of
from ..storage import filesystem


class ExportError(RuntimeError):
    """An encoder that cannot be loaded (missing, truncated, corrupt or mis-shaped). ``vanished``: a file
    of it was not there when read (an export being replaced, on storage without an atomic swap)."""

    def __init__(self, message: str, vanished: bool = False):
        super().__init__(message)
        self.vanished = vanished


def sizes_from_meta(meta: ExportMeta) -> XTRASizes:
    known = {f.name for f in fields(XTRASizes)}
    if not isinstance(meta.sizes, dict) or not meta.sizes:
        raise ExportError(f"{META_FILE} has no 'sizes' (written by another version?)")
    return XTRASizes(**{k: v for k, v in meta.sizes.items() if k in known})


def load_export(folder: str, storage_options: dict | None = None) -> tuple[XTRAEncoder, ExportMeta]:
    """(encoder, meta) from an export folder. Raises :class:`ExportError`."""
    from safetensors.torch import load as load_bytes

    fs, path = filesystem(folder, storage_options)
    try:
        meta = ExportMeta.from_json(fs.cat_file(f"{path}/{META_FILE}"))
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {META_FILE}", vanished=True) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{folder}/{META_FILE} is not valid JSON ({e})") from None
    try:
        blob = fs.cat_file(f"{path}/{ENCODER_FILE}")
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {ENCODER_FILE}", vanished=True) from None
    try:
        state = load_bytes(blob)
    except Exception as e:  # safetensors raises its own error types on truncated or garbled files
        raise ExportError(f"{folder}/{ENCODER_FILE} is not a readable safetensors file "
                          f"({type(e).__name__}: {e})") from None
    try:
        enc = XTRAEncoder(sizes_from_meta(meta))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{folder}/{META_FILE}: sizes do not describe a model ({e})") from None
    try:
        load_state_dict_checked(enc, state, f"{folder}/{ENCODER_FILE}")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return _frozen(enc), meta


def load_weights_file(path: str, model: str, **size_overrides) -> tuple[XTRAEncoder, ExportMeta]:
    """(encoder, meta) from an official checkpoint or any state-dict file holding an encoder."""
    if not model:
        raise ExportError(f"{path}: a weights file does not say which model it holds; pass --model "
                          f"(e.g. xtra_vit_huge_patch14) and, if not the default, --img-size / --block-size")
    try:
        enc = XTRAEncoder(model_sizes(model, **size_overrides))
        load_state_dict_checked(enc, encoder_from_any(read_checkpoint(path)), path)
    except (CheckpointError, ValueError, TypeError) as e:
        raise ExportError(str(e)) from None
    return _frozen(enc), ExportMeta(model=model, sizes=dict(enc.sizes.__dict__), extra={"source": path})


def load_zero_checkpoint(folder: str) -> tuple[XTRAEncoder, ExportMeta]:
    """(encoder, meta) from a ZeRO checkpoint folder of a run made by this project."""
    from ..config import load_config, sizes_from_config

    ckpt = Path(folder)
    cfg_path = ckpt.parent.parent / CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{folder}: no {cfg_path} beside the checkpoints to say which model this is")
    cfg = load_config(str(cfg_path))
    sizes = sizes_from_config(cfg.model, cfg.objective)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ENCODER_FILE
        try:
            consolidate(ckpt, out, encoder_only=True)
        except Exception as e:  # DeepSpeed's reader raises assorted errors on incomplete folders
            raise ExportError(f"{folder}: cannot be consolidated ({type(e).__name__}: {e})") from None
        enc = XTRAEncoder(sizes)
        try:
            load_state_dict_checked(enc, read_checkpoint(out), folder)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
    return _frozen(enc), ExportMeta(step=step_of(ckpt.name) or 0, model=cfg.model.name, sizes=dict(sizes.__dict__),
                                    extra={"source": folder})


def load_encoder(source: str, *, model: str = "", storage_options: dict | None = None,
                 **size_overrides) -> tuple[XTRAEncoder, ExportMeta]:
    """A frozen encoder from an export folder, a ZeRO checkpoint folder or a weights file, and what is known of
    it (an export's meta.json; for the others its model, sizes and ``extra["source"]``)."""
    fs, path = filesystem(source, storage_options)
    if fs.isdir(path):
        if fs.exists(f"{path}/{META_FILE}"):
            return load_export(source, storage_options)
        if "://" not in source and any(Path(source).glob("*model_states.pt")):
            return load_zero_checkpoint(source)
        raise ExportError(f"{source}: a folder that is neither an encoder export ({META_FILE} + {ENCODER_FILE}) "
                          f"nor a ZeRO checkpoint")
    if "://" in source:  # weights files are read locally; fetch a remote one first
        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / Path(path).name)
            fs.get_file(path, local)
            return load_weights_file(local, model, **size_overrides)
    return load_weights_file(source, model, **size_overrides)


def _frozen(enc: XTRAEncoder) -> XTRAEncoder:
    enc.eval().requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in enc.parameters()):
        raise ExportError("the encoder holds non-finite weights (NaN/Inf): the run diverged before this export")
    return enc
