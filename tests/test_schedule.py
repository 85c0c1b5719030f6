import pytest

from xtra_ds.engine.schedule import lr_at, param_groups

from conftest import tiny


def test_lr_schedule_by_hand():
    kw = dict(total_steps=110, warmup_steps=10, peak_lr=1e-3, warmup_start_lr=1e-4, final_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(5, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # cosine midpoint
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert lr_at(500, **kw) == pytest.approx(1e-6)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=False))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then monotone decay


def test_no_warmup():
    assert lr_at(0, total_steps=10, warmup_steps=0, peak_lr=1.0, final_lr=0.0) == pytest.approx(1.0)


def test_param_groups_follow_the_reference():
    """Decayed: every tensor but biases and 1-D tensors; the position embeddings [1, N, d] are decayed."""
    model = tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"enc.pos_embed", "predictor.pos_embed", "enc.patch_embed.proj.weight", "enc.blocks.0.attn.qkv.weight",
            "proj.mlp.2.weight", "aim_proj.0.mlp.0.weight"} <= d
    assert {"enc.blocks.0.norm1.weight", "enc.norm.weight", "enc.blocks.0.attn.qkv.bias", "enc.patch_embed.proj.bias",
            "aim_proj.0.mlp.2.bias"} <= nd
    assert d == {n for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")}
    assert len(nd) + len(d) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
