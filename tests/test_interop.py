"""Official checkpoint layout in, timm layout out, and clear errors for bad files."""

import pytest
import torch

from xtra_ds.interop import CheckpointError, encoder_to_timm, export_encoder, load_official, main, read_checkpoint
from xtra_ds.models.raster_reference import raster_forward, raster_loss
from xtra_ds.objective import NextBlockLoss

from conftest import tiny, tiny_sizes


def official_state_dict(model):
    """A state dict in the official layout with fresh random values (not the model's own)."""
    g = torch.Generator().manual_seed(123)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kw", [dict(), dict(heads_ahead=2), dict(block_size=1), dict(img_size=48, block_size=3)])
@pytest.mark.parametrize("fmt", ["lightning", "deepspeed"])
def test_official_checkpoint_round_trip(tmp_path, fmt, kw):
    model = tiny(**kw).eval()
    sd = official_state_dict(model)
    path = tmp_path / "xtra.ckpt"
    torch.save({"state_dict": sd, "epoch": 3} if fmt == "lightning" else {"module": sd, "buffer_names": []}, path)
    load_official(model, path)
    x = torch.randn(2, 3, model.sizes.img_size, model.sizes.img_size)
    with torch.no_grad():
        out = model(x)
        ours = NextBlockLoss()(out.preds, out.targets)
        ref = raster_loss(sd, model.sizes, x)
        ref_preds, ref_t = raster_forward(sd, model.sizes, x)
    torch.testing.assert_close(out.targets, ref_t)
    torch.testing.assert_close(out.preds[0], ref_preds[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_key_layout_is_official():
    keys = set(tiny().state_dict())
    for k in ("enc.patch_embed.proj.weight", "enc.pos_embed", "enc.blocks.0.attn.qkv.bias",
              "enc.blocks.1.mlp.fc2.weight", "enc.norm.bias", "proj.mlp.0.weight", "proj.mlp.2.weight",
              "predictor.pos_embed", "predictor.blocks.1.norm2.weight", "predictor.norm.weight",
              "aim_proj.0.mlp.0.bias", "aim_proj.0.mlp.2.bias"):
        assert k in keys, k
    assert "proj.mlp.2.bias" not in keys


def test_wrong_or_truncated_file(tmp_path):
    model = tiny()
    sd = official_state_dict(model)
    del sd["enc.norm.weight"]
    sd["enc.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError, match=r"missing keys: enc\.norm\.weight.*unexpected keys: enc\.extra\.weight"):
        load_official(model, bad)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": official_state_dict(model)}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        read_checkpoint(cut)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatches: .*enc.pos_embed \(1, 16, 32\) vs model \(1, 36, 32\)"):
        load_official(tiny(img_size=48, block_size=3), good)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": print}, path)  # arbitrary object: not allowed
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_timm_export(tmp_path):
    from safetensors.torch import load_file
    model = tiny()
    export_encoder(model.enc, tmp_path / "enc.safetensors", {"step": "10"})
    sd = load_file(str(tmp_path / "enc.safetensors"))
    # timm VisionTransformer(class_token=False, global_pool='avg', fc_norm=False) key layout
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias"}
    for i in range(model.sizes.depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 16, 32)
    for k, v in encoder_to_timm(model.enc).items():
        assert torch.equal(sd[k], v)


def test_cli(tmp_path, capsys):
    model = tiny(img_size=64)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": model.state_dict()}, path)
    # the CLI builds the named variant at its own sizes; a tiny test model does not fit it -> clear error
    assert main(["load", str(path), "--model", "xtra_vit_tiny_patch8", "--img-size", "64", "--block-size", "2"]) == 2
    assert "does not fit XTRA" in capsys.readouterr().err
    full = __import__("xtra_ds").create_model("xtra_vit_tiny_patch16", img_size=64, block_size=2)
    torch.save({"module": full.state_dict()}, path)
    assert main(["load", str(path), "--model", "xtra_vit_tiny_patch16", "--img-size", "64", "--block-size", "2"]) == 0
    out = tmp_path / "enc.safetensors"
    assert main(["timm", str(path), "--model", "xtra_vit_tiny_patch16", "--img-size", "64", "--block-size", "2",
                 "-o", str(out)]) == 0
    assert out.is_file()


def test_timm_mask_is_the_encoders_mask_in_raster_order():
    """timm's ViT is bidirectional; the mask a timm user passes must be exactly ours, in raster order."""
    from xtra_ds.interop import timm_attention_mask
    from xtra_ds.models.attention import BlockCausal
    from xtra_ds.models.raster_reference import raster_mask
    from xtra_ds.models.tokens import block_token_index

    for k in (1, 2, 4):
        s = tiny_sizes(img_size=64, block_size=k)
        mask = timm_attention_mask(s)
        assert mask.shape == (s.num_tokens, s.num_tokens) and mask.dtype == torch.bool
        assert torch.equal(mask, raster_mask(s))
        seq = BlockCausal(s.num_blocks, s.block_tokens).dense()  # the model's own, block-major
        idx = block_token_index(s.grid, k)
        raster = torch.empty_like(seq)
        raster[idx.unsqueeze(1), idx.unsqueeze(0)] = seq
        assert torch.equal(mask, raster)
    assert not torch.equal(timm_attention_mask(tiny_sizes()), torch.ones_like(timm_attention_mask(tiny_sizes())))


def test_the_torch_floor_is_checked_with_what_to_install():
    from xtra_ds.compat import check_torch

    check_torch("2.13.0+cpu")
    check_torch("2.5.1+cu121")
    with pytest.raises(ImportError, match=r"needs torch >= 2.5; this environment has torch 2.4.1.*pip install"):
        check_torch("2.4.1")


def test_repartitioning_needs_no_torch_2_7_module(tmp_path):
    """``torch.utils.serialization`` (its CRC-32 switch) appeared in torch 2.7: without it the re-partitioning
    still imports and saves (training on an older torch once could not even start)."""
    import subprocess
    import sys

    code = ("import builtins, torch\n"
            "real = builtins.__import__\n"
            "def older_torch(name, globals=None, *args, **kwargs):  # the module is missing for our code\n"
            "    if name.startswith('torch.utils.serialization') and (globals or {}).get('__name__', '')"
            ".startswith('xtra_ds'):\n"
            "        raise ModuleNotFoundError(name)\n"
            "    return real(name, globals, *args, **kwargs)\n"
            "builtins.__import__ = older_torch\n"
            "from pathlib import Path\n"
            "from xtra_ds.interop.reshard import _save\n"
            f"_save({{'x': torch.arange(3)}}, Path({str(tmp_path / 'out.pt')!r}))\n"
            f"assert torch.load({str(tmp_path / 'out.pt')!r})['x'].tolist() == [0, 1, 2]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
