"""Paper exactness where only the engine runs: init under zero.Init, targets under bf16, the engine's
steps against plain PyTorch from the same weights. DeepSpeed cases run in processes of their own
(tests/helpers/ds_cases.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xtra_ds.data.transforms import normalize_on_device
from xtra_ds.engine.step import PlainEngine, train_step
from xtra_ds.models.tokens import image_blocks, normalize_blocks
from xtra_ds.objective import NextBlockLoss

from conftest import tiny

HERE = Path(__file__).resolve().parent


def ds_case(name: str, tmp_path, *args) -> dict:
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(HERE / "helpers/ds_cases.py"), name, str(out), *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_init_under_zero_init_is_the_init(tmp_path):
    """Every tensor of the model as the engine builds it (under deepspeed.zero.Init, partitioned as each
    module's constructor returns) equals the plain build from the same seed, value for value: the
    init runs inside the constructors, before partitioning, and draws the same random numbers in the
    same order. The patch embedding is the reference's: kaiming-normal (fan_in, ReLU gain), zero bias.
    In bf16, where zero.Init creates the parameters in bf16, they equal the plain fp32 init rounded once
    (drawing in bf16 made a trunc-normal put some weights at ±2, a hundred standard deviations: H/14's first
    loss on a GPU was 20,000)."""
    res = ds_case("init", tmp_path)
    for precision, r in res.items():
        assert r["partitioned"]
        assert r["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
        # weight decay follows the full shapes, not ZeRO-3's 1-D placeholders (which once put every tensor
        # in the no-decay group: the engine trained without weight decay)
        assert r["decay_groups_zero"] == r["decay_groups_plain"] and "enc.pos_embed" in r["decay_groups_zero"][0]
        assert r["max_abs_diff"] and all(v == 0.0 for v in r["max_abs_diff"].values()), (precision, r["max_abs_diff"])
        assert r["patch_std"] == pytest.approx(math.sqrt(2 / r["patch_fan_in"]), rel=0.03)
        assert r["patch_bias_abs_max"] == 0.0


def test_only_the_writing_rank_holds_an_export(tmp_path):
    """Every rank gathers every encoder tensor for an export (the gathers are collective), but only rank 0 keeps
    them: for H/14 the others used to hold 2.5 GB each of host memory (8 copies per node)."""
    res = ds_case("export_keep", tmp_path)
    assert res["kept"] == res["params"] > 0 and res["dropped"] == 0
    assert res["gathers_keep"] == res["gathers_drop"] == res["params"]


def test_plain_patch_embedding_init():
    w = tiny(patch_size=16, img_size=64, dim=256).enc.patch_embed.proj
    assert w.weight.std().item() == pytest.approx(math.sqrt(2 / (3 * 16 * 16)), rel=0.02)  # 0.051
    assert torch.count_nonzero(w.bias) == 0


@pytest.mark.parametrize("kind", ["zero3", "zero3_bf16", "zero0", "plain"])
def test_a_skipped_step_leaves_no_trace(kind, tmp_path):
    """A non-finite loss in one micro batch, or a finite loss with non-finite gradients, skips the update:
    the master weights, both Adam moments and the step count are exactly as before, whichever engine.
    (A skip used to step with lr 0 — Adam's moments and step count still moved — and ZeRO stage 0 or plain
    PyTorch applied an update with non-finite gradients.)"""
    res = ds_case("skipped_steps", tmp_path, kind)
    assert res["nan_loss"]["skipped"] and res["nan_loss"]["changed"] == [], res["nan_loss"]
    assert res["nan_grad"]["finite_loss"] and res["nan_grad"]["skipped"], res["nan_grad"]
    assert res["nan_grad"]["changed"] == [], res["nan_grad"]
    assert not res["good"]["skipped"] and res["good"]["changed"] > 0.5 * res["tensors"], res  # a real step moves


def test_repartitioning_follows_deepspeeds_sub_groups(tmp_path):
    """DeepSpeed splits each parameter group into sub-groups of ``sub_group_size`` partition elements — and with
    0, one per parameter. Re-partitioning a checkpoint for the world that saved it must reproduce its
    sub-groups, partitions and moments exactly, and DeepSpeed must load the result."""
    res = ds_case("subgroups", tmp_path, tmp_path)
    assert res["0"]["sub_groups"] > 2 and res["3000"]["sub_groups"] > 2, res  # both really split
    for size, r in res.items():
        assert r["resharded_sub_groups"] == r["sub_groups"] and all(r["same"]) and r["loads"], (size, r)


def test_targets_come_from_full_precision_pixels():
    """A bf16 model (as DeepSpeed's bf16 engine holds it) stepped by train_step computes its targets from the
    fp32 images; rounding the input to bf16 first would move them by ~1e-2."""
    model = tiny().to(torch.bfloat16)
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    res = train_step(engine, [{"images": images}], loss_fn=NextBlockLoss(), lr=0.0, order=None,
                     device=torch.device("cpu"))
    x = normalize_on_device(images)
    want = normalize_blocks(image_blocks(x, 16))
    assert res.output.preds[0].dtype == torch.bfloat16 and res.output.targets.dtype == torch.float32
    torch.testing.assert_close(res.output.targets, want, rtol=0, atol=0)
    rounded = normalize_blocks(image_blocks(x.bfloat16().float(), 16))
    assert (rounded - want).abs().max() > 1e-3  # what the test would see without the fix


def test_a_step_reads_the_device_once(monkeypatch):
    """train_step waits for the device once per optimizer step, however many micro batches: the all-reduce that
    decides the skip comes back to the host in one read (dist.sum_over_ranks), with the loss and the stop flag in
    it; train_step itself reads no tensor (the gradient norm waits until a log step asks for it)."""
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            caller = sys._getframe(1).f_code
            reads.append((caller.co_filename.rsplit("/", 1)[-1], caller.co_name, name))
            return original(self, *a, **kw)
        return read

    model = tiny()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), accum=2)
    micro = [{"images": torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)} for _ in range(2)]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    res = train_step(engine, micro, loss_fn=NextBlockLoss(), lr=0.1, order=None, device=torch.device("cpu"))
    monkeypatch.undo()
    ours = [r for r in reads if r[0] in ("step.py", "dist.py") and r[1] != "step"]  # PlainEngine.step: the engine's
    assert ours == [("dist.py", "sum_over_ranks", "tolist")], ours
    assert math.isfinite(res.loss) and not res.skipped and math.isfinite(res.grad_norm)


def test_bf16_engine_targets_are_fp32(tmp_path):
    res = ds_case("bf16_targets", tmp_path)
    assert res["preds_dtype"] == "torch.bfloat16" and res["targets_dtype"] == "torch.float32"
    assert res["max_abs_diff"] == 0.0


def test_engine_steps_equal_plain_pytorch_from_the_same_weights(tmp_path):
    """Six steps of a fp32 ZeRO-3 engine and of plain PyTorch started from the engine's gathered initial
    weights, through the same train_step on the same batches. Measured: the same losses, gradient norms
    within 7e-8 relative, the same weights. The tolerances have teeth: the patch embedding with
    PyTorch's default init (the zero.Init bug), or the learning rate 5% off, breaks every one of them
    (loss 2e-4, norms 8e-3, weights 5e-3 apart at least); so did weight decay missing from the
    engine (norms 1.3e-4, weights 3e-4 apart) before param_groups judged ZeRO-3 parameters by ds_shape."""
    res = ds_case("engine_vs_plain", tmp_path)
    engine_loss, engine_norm = res["engine"]
    plain_loss, plain_norm = res["plain"]
    assert engine_loss == pytest.approx(plain_loss, rel=1e-6)
    assert engine_norm == pytest.approx(plain_norm, rel=1e-6)
    assert res["plain_distance"] < 1e-6
    for wrong in ("plain_wrong_init", "plain_lr_off"):
        assert engine_loss != pytest.approx(res[wrong][0], rel=1e-6), wrong
        assert engine_norm != pytest.approx(res[wrong][1], rel=1e-6), wrong
        assert res[f"{wrong}_distance"] > 1e-6, wrong


def test_zero3_leaf_blocks_gathers_each_block_whole_with_the_same_numbers(tmp_path):
    """deepspeed.zero3_leaf_blocks=true (the default): DeepSpeed flags every transformer block of the encoder and
    the predictor as a ZeRO-3 leaf and nothing else, so none of the modules inside a block gets ZeRO-3's module
    hooks; off, none is flagged and every Linear/LayerNorm inside is hooked. Both engines step alike from the
    same init: the same losses and gradient norms to the engine-vs-plain tolerance."""
    res = ds_case("leaf_blocks", tmp_path)
    on, off = res["on"], res["off"]
    assert on["blocks"] == off["blocks"] and len(on["blocks"]) >= 2
    assert any(b.startswith("enc.") for b in on["blocks"]) and any(not b.startswith("enc.") for b in on["blocks"])
    assert on["leaves"] == on["blocks"], on["leaves"]
    assert on["hooked_in_blocks"] == []
    assert off["leaf_module_config"] is None and off["leaves"] == []
    assert len(off["hooked_in_blocks"]) >= 5 * len(off["blocks"])  # norm1, attn (qkv, proj), norm2, mlp (fc1, fc2)
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-6)
    assert on["norms"] == pytest.approx(off["norms"], rel=1e-6)
    assert on["losses"][-1] != pytest.approx(on["losses"][0], rel=1e-6)  # it trained


def test_throughput_and_data_wait_describe_the_whole_window(tmp_path):
    """A 1.5 s loader stall at step 5 (between the log lines of steps 3 and 6) shows in step 6's figures:
    the data wait and the images/s cover steps 4–6, not step 6 alone (which waited for nothing)."""
    from data_prep import shard as shard_tool

    from helpers.corpus import plain_corpus

    plain_corpus(tmp_path / "in", 40, size=(48, 48))
    assert shard_tool.main([str(tmp_path / "in"), "--output", str(tmp_path / "shards"), "--workers", "1",
                            "--min-side", "16"]) == 0
    every = ds_case("metrics_window", tmp_path, tmp_path / "shards/manifest.json", tmp_path / "run")["rows"]
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5, 6]  # a row per step: the key digest, exact
    assert all(type(r["data/keys_digest"]) is int and r["data/keys_digest"] > 0 for r in every)
    rows = {r["step"]: r for r in every if "train/loss" in r}
    assert sorted(rows) == [3, 6]
    at6 = rows[6]
    window_s = 3 * at6["perf/step_time"]
    assert window_s > 1.5 and at6["perf/data_wait_fraction"] == pytest.approx(1.5 / window_s, abs=0.08)
    assert at6["perf/images_per_sec"] == pytest.approx(3 * 8 / window_s, rel=1e-6)
    waited_by_3 = rows[3]["perf/data_wait_fraction"] * 3 * rows[3]["perf/step_time"]  # seconds, steps 1-3
    assert waited_by_3 < 1.5  # the stall (step 5) is not in step 3's window: its wait is the decoding alone


def test_memory_check_refuses_with_the_numbers_and_the_fix(monkeypatch):
    from xtra_ds.config import ConfigError, batch_plan, derive, load_config
    from xtra_ds.costs import memory

    cfg = load_config(Path(__file__).parents[1] / "ds_configs/xtra_vit_h14_in21k.yaml")
    monkeypatch.setattr(memory, "device_memory", lambda device: (8 * memory.GiB, "a test device"))
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=10**6)
    with pytest.raises(ConfigError, match=r"865M parameters, bf16, ZeRO-3, 1 rank\(s\)\) needs ≈1\d\.\d GiB per rank.*"
                                          r"20\.0 bytes/parameter.*a test device: 8\.0 GiB: it does not fit\. "
                                          r"Use more ranks \(ZeRO-3 divides the model states by them: 4 would fit\)"):
        memory.check_fits(cfg, plan, 865_018_240, torch.device("cpu"))
    memory.check_fits(cfg, derive(cfg, batch_plan(cfg.optim, 4), data_samples=10**6), 865_018_240,
                      torch.device("cpu"))  # 4 ranks: 5.4 of 8 GiB
    assert memory.bytes_per_parameter("bf16", 3, 8) == 20 / 8
    assert memory.bytes_per_parameter("fp32", 1, 4) == 4 + 8 + 12 / 4


@pytest.mark.parametrize("overrides", [["deepspeed.zero_stage=1", "deepspeed.precision=fp32"],
                                       ["deepspeed.zero_stage=3", "deepspeed.precision=bf16-mixed"],
                                       ["deepspeed.zero_stage=0"]])
def test_memory_advice_names_only_settings_that_help(overrides, monkeypatch):
    """Every setting the refusal suggests is one the config and builder accept and one the estimate counts:
    applied, it needs less memory (optimizer offload, which the estimate ignores and DeepSpeed refuses with
    our client optimizer, is never suggested)."""
    import re

    from xtra_ds.config import ConfigError, batch_plan, derive, load_config
    from xtra_ds.costs import memory

    recipe = Path(__file__).parents[1] / "ds_configs/xtra_vit_h14_in21k.yaml"
    monkeypatch.setattr(memory, "device_memory", lambda device: (6 * memory.GiB, "a test device"))
    cfg = load_config(recipe, overrides)
    plan = derive(cfg, batch_plan(cfg.optim, 2), data_samples=10**6)
    before = memory.estimate(cfg, plan, 865_018_240).total
    with pytest.raises(ConfigError, match="it does not fit") as e:
        memory.check_fits(cfg, plan, 865_018_240, torch.device("cpu"))
    assert "offload" not in str(e.value)
    suggested = re.findall(r"(deepspeed\.\w+=[\w-]+)(?: on (\d+) ranks)?", str(e.value))
    assert suggested, str(e.value)
    for setting, ranks in suggested:
        better = load_config(recipe, [*overrides, setting])
        world = int(ranks) if ranks else 2
        assert memory.estimate(better, derive(better, batch_plan(better.optim, world), 10**6), 865_018_240).total \
            < before, setting
