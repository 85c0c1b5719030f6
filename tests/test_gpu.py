"""What only a CUDA device shows. Skipped (with the reason) where there is none; run them on a GPU machine with
``python -m pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from xtra_ds.models.attention import attention_kernel, attention_names, kernel_errors, require_close
from xtra_ds.models.xtra import model_sizes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (these check CUDA kernels)")]


def test_bf16_parameters_are_initialised_from_fp32_draws():
    """Under zero.Init with bf16 the parameters are created in bf16 on the GPU, and each module initialises its
    own in its constructor. CUDA's trunc_normal_ on a bf16 tensor rounds some uniform draws to ±1, whose inverse
    error function is infinite: clamped to ±2, a hundred standard deviations (XTRA-H/14's first loss was 20,000
    instead of 8). Drawn in fp32 and rounded once, the weights have the init's statistics."""
    from xtra_ds.models.layers import INIT_STD, Linear, PatchConv, Trunk

    torch.manual_seed(0)
    made = {"linear": Linear(1280, 5120, device="cuda", dtype=torch.bfloat16).weight,  # H/14's MLP, as zero.Init
            "patch": PatchConv(3, 1280, 14, 14, device="cuda", dtype=torch.bfloat16).weight}
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            made["pos_embed"] = Trunk(num_tokens=256, dim=1280, depth=1, num_heads=16, mlp_hidden=64).pos_embed
        finally:
            torch.set_default_dtype(torch.float32)
    for name, w in made.items():
        w = w.detach().float()
        std = INIT_STD if name != "patch" else (2 / (3 * 14 * 14)) ** 0.5
        assert w.abs().max() < 8 * std, (name, float(w.abs().max()))  # a normal sample never reaches 8σ here
        assert float(w.std()) == pytest.approx(std, rel=0.05), name


@pytest.mark.parametrize("name", attention_names())
def test_attention_kernels_match_fp32_sdpa(name):
    """Every attention kernel of xtra_ds.models.attention, forward and backward in bf16 at XTRA-H/14's attention shape
    (256 tokens in 16 blocks, 16 heads of 80: flex pads them to 128), is as close to fp32 SDPA with the dense
    block-causal mask as the default path is (bench/bench_gpu.py checks the same before it times a kernel)."""
    errors = kernel_errors(attention_kernel(name), model_sizes("xtra_vit_huge_patch14"), batch=2,
                           device=torch.device("cuda"), grad=True)
    require_close(name, errors)
    assert set(errors) == {"out_err", "grad_err", "sdpa_out_err", "sdpa_grad_err"}


def test_a_pinned_batch_buffer_is_not_refilled_during_its_device_copy():
    """The trainer's batches sit in reused page-locked buffers and reach the GPU without the host waiting: a
    buffer refilled at once after its copy was queued must not change what arrives on the device. A slow
    kernel queued first keeps the copy waiting on the stream while the host refills the buffer."""
    from xtra_ds.data.handover import Buffers, to_device

    pool = Buffers((64, 224, 224, 3), torch.uint8, pin_memory=True)
    busy = torch.randn(8192, 8192, device="cuda")
    for trial in range(3):
        host = pool.get()
        host.fill_(1)
        for _ in range(4):
            busy = busy @ busy / 8192  # the stream is busy: the copy below queues behind it
        on_device = to_device(host, "cuda")
        del host
        pool.get().fill_(2)  # the next batch into the same buffer, as the loader does
        assert bool((on_device == 1).all()), f"trial {trial}: the device copy read the refilled buffer"
