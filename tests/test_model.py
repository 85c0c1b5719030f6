import pytest
import torch

from xtra_ds.models import XTRA, create_model, model_sizes
from xtra_ds.models.attention import BlockCausal
from xtra_ds.models.raster_reference import raster_mask
from xtra_ds.models.tokens import block_orders, block_token_index

from conftest import tiny, tiny_sizes

# DESIGN.md: exact parameter counts of the paper's models.
COUNTS = {
    "xtra_vit_base_patch16": dict(enc=85_843_200, proj=6_295_552, predictor=56_901_120, aim_proj=151_013_376,
                                  total=300_053_248),
    "xtra_vit_huge_patch14": dict(enc=630_762_240, proj=9_835_520, predictor=39_553_280, aim_proj=184_867_200,
                                  total=865_018_240),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    parts = ("enc", "proj", "predictor", "aim_proj")
    got = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in parts}
    got["total"] = sum(p.numel() for p in model.parameters())
    assert got == COUNTS[name]


def brute_force_mask(gh, gw, k):
    """Independent construction: patch (r, c) is in block (r//k, c//k); attend iff earlier or same block."""
    n = gh * gw
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for j in range(n):
            bq = (q // gw // k, q % gw // k)
            bj = (j // gw // k, j % gw // k)
            m[q, j] = bj[0] * (gw // k) + bj[1] <= bq[0] * (gw // k) + bq[1]
    return m


@pytest.mark.parametrize("grid,k", [((4, 4), 2), ((6, 6), 3), ((4, 4), 1), ((8, 8), 4)])
def test_mask_matches_brute_force(grid, k):
    idx = block_token_index(grid, k)  # sequence position -> raster patch
    seq_mask = BlockCausal(grid[0] * grid[1] // k**2, k * k).dense()
    raster = torch.empty_like(seq_mask)
    raster[idx.unsqueeze(1), idx.unsqueeze(0)] = seq_mask  # back to raster order
    expected = brute_force_mask(*grid, k)
    assert torch.equal(raster, expected)
    s = model_sizes("xtra_vit_tiny_patch8", img_size=grid[0] * 8, block_size=k)
    assert torch.equal(raster_mask(s), expected)
    if k == 1:
        assert torch.equal(expected, torch.ones(16, 16, dtype=torch.bool).tril())


def test_block_orders_are_permutations_with_distinct_prefixes():
    orders = block_orders(16, 16)
    assert orders.shape == (16, 16)
    for o in orders:
        assert sorted(o.tolist()) == list(range(16))
    assert len(set(orders[:, 0].tolist())) == 16
    assert torch.equal(orders, block_orders(16, 16))  # fixed


def _block_pixel_mask(s, raster_block):
    bp = s.patch_size * s.block_size
    per_row = s.img_size // bp
    r, c = divmod(raster_block, per_row)
    m = torch.zeros(s.img_size, s.img_size, dtype=torch.bool)
    m[r * bp:(r + 1) * bp, c * bp:(c + 1) * bp] = True
    return m


@pytest.mark.parametrize("order", [None, 3])
def test_causality_by_gradients(order):
    """The prediction at sequence position i depends on exactly the blocks at positions <= i."""
    model = tiny(img_size=32, block_size=2).eval()  # 4x4 patches, 2x2 blocks of 16 px
    s = model.sizes
    x = torch.randn(1, 3, s.img_size, s.img_size, requires_grad=True)
    out = model(x, order=order)
    seq = out.block_order.tolist()
    for i in range(s.num_blocks):
        for what, tensor in (("encoder", None), ("predictor", out.preds[0][0, i])):
            x.grad = None
            if what == "encoder":
                tok_idx = model.enc.token_index if order is None else model.order_token_index[order]
                feats = model.enc(x, tok_idx)[0]
                tensor = feats[i * s.block_tokens:(i + 1) * s.block_tokens]
            # a random projection: a plain sum of LayerNorm outputs is identically 0
            (tensor * torch.randn_like(tensor)).sum().backward(retain_graph=True)
            g = x.grad[0].abs().sum(0)
            for pos, blk in enumerate(seq):
                touched = g[_block_pixel_mask(s, blk)].sum().item()
                if pos <= i:
                    assert touched > 0, f"{what}: block at position {i} ignores position {pos}"
                else:
                    assert touched == 0, f"{what}: block at position {i} sees the future position {pos}"


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(1)
    a = tiny(drop_path=0.1)
    b = tiny(drop_path=0.1)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for m in (a, b):
        torch.manual_seed(7)  # same drop-path draws
        out = m(x)
        loss = sum(p.square().mean() for p in out.preds)
        loss.backward()
        results.append((out.preds[0].detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_every_parameter_gets_a_gradient_and_bf16_is_finite():
    from xtra_ds.objective import NextBlockLoss
    model = tiny(heads_ahead=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = NextBlockLoss()(out.preds, out.targets)
    assert out.preds[0].dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_forward_intermediates():
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.enc.forward_intermediates(x, layers=3)
    assert len(feats) == 3 and feats[0].shape == (2, 16, 32)
    # last layer + final norm, block-major == the encoder's own forward
    last = model.enc.forward_intermediates(x, layers=[-1], norm=True, raster_order=False)[0]
    torch.testing.assert_close(last, model.enc(x))
    pooled = model.enc.forward_intermediates(x, layers=[0, 2], pool="avg")
    assert [p.shape for p in pooled] == [(2, 32), (2, 32)]
    torch.testing.assert_close(pooled[1], feats[2].mean(1))
    bidir = model.enc.forward_intermediates(x, layers=1, causal=False)[0]
    assert not torch.allclose(bidir, feats[2])  # the mask matters
    with pytest.raises(ValueError, match="does not select"):
        model.enc.forward_intermediates(x, layers=[5])


def test_model_name_errors():
    with pytest.raises(ValueError, match="did you mean 'xtra_vit_huge_patch14'"):
        create_model("xtra_vit_hug_patch14")
    with pytest.raises(ValueError, match="not divisible by patch_size × block_size"):
        create_model("xtra_vit_tiny_patch16", img_size=200)
    with pytest.raises(TypeError, match="unknown model option"):
        create_model("xtra_vit_tiny_patch16", widht=3)


def test_attention_is_injected_and_flex_equals_sdpa():
    """Every block of encoder and predictor runs the kernel the model was built with; the block-sparse
    flex kernel computes what dense-mask SDPA does (forward: flex has no CPU backward), padded head
    dims included."""
    from xtra_ds.models.attention import FlexAttention, attention_kernel, sdpa

    model = XTRA(tiny_sizes(), attention="flex")
    kernels = {id(m.kernel) for m in model.modules() if hasattr(m, "kernel")}
    assert len(kernels) == 1 and isinstance(model.enc.blocks[0].attn.kernel, FlexAttention)
    assert tiny().predictor.blocks[0].attn.kernel is sdpa
    flex = attention_kernel("flex")
    mask = BlockCausal(4, 4)
    for head_dim in (16, 12):  # 12 is padded to 16 inside the kernel
        q, k, v = (torch.randn(2, 2, 16, head_dim) for _ in range(3))
        torch.testing.assert_close(flex(q, k, v, mask), sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex(q, k, v, None), sdpa(q, k, v, None), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        attention_kernel("flash")


def test_the_kernel_check_passes_sdpa_and_catches_other_attention():
    """The check tests/test_gpu.py runs on every kernel and bench/bench_gpu.py before it times one, here on the
    CPU's kernel (sdpa, fp32: as close as fp32 gets) at XTRA-H/14's attention shape — and it refuses a kernel that
    attends bidirectionally, and one whose backward loses the keys' gradient."""
    from xtra_ds.models.attention import attention_kernel, kernel_errors, require_close, sdpa
    from xtra_ds.models.xtra import model_sizes

    sizes, cpu = model_sizes("xtra_vit_huge_patch14"), torch.device("cpu")
    errors = kernel_errors(attention_kernel("sdpa"), sizes, batch=2, device=cpu, grad=True)
    require_close("sdpa", errors)
    assert errors["out_err"] < 1e-5 and errors["grad_err"] < 1e-5
    bidirectional = kernel_errors(lambda q, k, v, mask: sdpa(q, k, v, None), sizes, batch=2, device=cpu, grad=True)
    with pytest.raises(RuntimeError, match="attention variant bidirectional: out differs from fp32 SDPA"):
        require_close("bidirectional", bidirectional)
    keys_frozen = kernel_errors(lambda q, k, v, mask: sdpa(q, k.detach(), v, mask), sizes, batch=2, device=cpu,
                                grad=True)
    assert keys_frozen["out_err"] < 1e-5
    with pytest.raises(RuntimeError, match="attention variant keys_frozen: grad differs"):
        require_close("keys_frozen", keys_frozen)



def test_attention_health_reads_each_layers_logits_without_changing_the_output():
    """Largest logit and mean entropy per layer, computed by hand for one layer; the model's output unchanged and
    its kernels restored."""
    import math

    from xtra_ds.models.attention import AttentionHealth, BlockCausal

    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    captured = {}
    block = model.enc.blocks[0]
    block.attn.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0].detach()))
    with AttentionHealth(model) as health:
        out = model(x)
    torch.testing.assert_close(out.preds[0], ref.preds[0], rtol=1e-3, atol=1e-3)  # softmax by hand vs SDPA
    assert set(health.stats) == {f"enc.{i:02d}" for i in range(len(model.enc.blocks))} | \
        {f"pred.{i:02d}" for i in range(len(model.predictor.blocks))}
    assert all(b.attn.kernel is model.enc.blocks[0].attn.kernel for b in model.enc.blocks)  # restored
    h = block.attn.num_heads
    B, N, D = captured["x"].shape
    q, k, _ = block.attn.qkv(captured["x"]).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(D // h)
    mask = BlockCausal(model.sizes.num_blocks, model.sizes.block_tokens).dense()
    logits = logits.masked_fill(~mask, float("-inf"))
    p = logits.softmax(-1)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    assert health.stats["enc.00"] == pytest.approx((float(logits.max()), entropy), rel=1e-4)
    assert 0 < entropy < math.log(N)
