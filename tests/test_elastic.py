"""Resuming on another allocation, under the real `deepspeed` launcher: a checkpoint saved by 2 ranks goes on
on 1 rank, 3 ranks or 2 emulated nodes, and one saved by 1 rank on 2 ranks, along the uninterrupted run's loss
curve (fp32, so that only the reduction order differs). The data side (the same global batches on every layout)
is tested without DeepSpeed in tests/test_loader.py."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest
import torch

from xtra_ds.engine.dist import free_port

from test_engine import RECIPE, ROOT, launch, losses, shards  # noqa: F401  (shards is a fixture)

pytestmark = pytest.mark.slow

FP32 = ("deepspeed.precision=fp32", "checkpoint.export_every=0", "logging.recon_every=0")


def run(run_dir, shards, steps, gpus=2):  # noqa: F811
    rc, out = launch(run_dir, shards, steps, *FP32, gpus=gpus)
    assert rc == 0, out
    return out


def continued(saved_run, step, run_dir):
    """A fresh run directory holding only ``saved_run``'s checkpoint of ``step``."""
    name = f"checkpoints/step_{step:08d}"
    shutil.copytree(saved_run / name, run_dir / name)
    return run_dir


def same_curve(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=2e-5, abs=1e-6), (s, got, want)


@pytest.fixture(scope="module")
def saved_by_two(shards, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("two") / "run"
    run(run_dir, shards, 8)
    return run_dir, losses(run_dir)


def test_two_ranks_resume_on_one_and_on_three(saved_by_two, shards, tmp_path):  # noqa: F811
    """2 → 1 rank and 2 → 3 ranks (8 images per step: shares of 2, 3 and 3, losses weighted): the ZeRO-3
    states are re-partitioned at start, logged in one line, and steps 5–8 follow the 2-rank run."""
    from xtra_ds.interop import ZeroCheckpoint

    saved, want = saved_by_two
    for world in (1, 3):
        run_dir = continued(saved, 4, tmp_path / f"on{world}")
        out = run(run_dir, shards, 8, gpus=world)
        assert f"step_00000004 was saved by 2 ranks: re-partitioned for {world}" in out, out
        assert f"on {world} ranks" in out and "resumed from" in out
        same_curve(losses(run_dir), want, range(5, 9))
        # the files it loaded hold the saved master weights and both Adam moments, tensor by tensor
        original = ZeroCheckpoint(saved / "checkpoints/step_00000004")
        moved = ZeroCheckpoint(run_dir / f"checkpoints/step_00000004/world_{world}")
        assert moved.world_size == world
        where = {name: (group, offset) for name, _, group, offset in moved.layout()}
        for name, shape, group, offset in original.layout():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(original.full(group, offset, shape, key), moved.full(*where[name], shape, key))
        for name, shape, group, offset in moved.layout():  # and zeros where a partition pads a parameter
            part = -(-shape.numel() // world)
            for rank in range(world):
                held = max(0, min(part, shape.numel() - rank * part))
                flat = moved.optim(rank)["fp32_flat_groups"][group]
                assert not flat[offset + held:offset + part].any(), (name, rank)
    # the step-8 checkpoints of the 1-rank and 2-rank runs hold the same optimizer state (to fp32 rounding)
    a, b = (ZeroCheckpoint(d / "checkpoints/step_00000008") for d in (saved, tmp_path / "on1"))
    for (name, shape, group, offset), (name_b, _, group_b, offset_b) in zip(a.layout(), b.layout(), strict=True):
        assert name == name_b
        torch.testing.assert_close(a.full(group, offset, shape, "exp_avg"), b.full(group_b, offset_b, shape, "exp_avg"),
                                   rtol=1e-4, atol=1e-7)


def test_one_rank_resumes_on_two(shards, tmp_path):  # noqa: F811
    saved = tmp_path / "one"
    run(saved, shards, 8, gpus=1)
    run_dir = continued(saved, 4, tmp_path / "on2")
    out = run(run_dir, shards, 8, gpus=2)
    assert "step_00000004 was saved by 1 ranks: re-partitioned for 2" in out, out
    same_curve(losses(run_dir), losses(saved), range(5, 9))


def test_two_ranks_resume_as_two_nodes(saved_by_two, shards, tmp_path):  # noqa: F811
    saved, want = saved_by_two
    run_dir = continued(saved, 4, tmp_path / "nodes")
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / "launchers/pretrain.py"), "--config", RECIPE, f"data.train={shards}",
                               f"run_dir={run_dir}", "schedule.total_steps=8", *FP32],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "resumed from" in outs[0] and "re-partitioned" not in outs[0]
    same_curve(losses(run_dir), want, range(5, 9))


def test_inspect_checkpoint_tells_what_a_layout_would_do(saved_by_two):
    saved, _ = saved_by_two
    r = subprocess.run([sys.executable, str(ROOT / "launchers/inspect_checkpoint.py"), str(saved), "--world-size", "1",
                        "--world-size", "3", "--world-size", "9", "--config", RECIPE, "optim.micro_batch_size=2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "step_00000008" in text and "step 8 of 8; ZeRO-3 fp32; global batch 8" in text
    assert "saved by 2 ranks: micro batch 4 × 1 accumulation per rank, 1 loader workers per rank" in text
    assert "data: epoch 0, step 8 of its 20; 8 canonical streams, seed 1" in text
    assert "data order of the planned config: the same" in text
    assert "1 ranks: exact — 4 micro batches of 2 per rank; ZeRO-3 states re-partitioned at start" in text
    assert "3 ranks: exact — rank shares of 2–3 images, 2 micro batches of at most 2 (losses weighted by size)" in text
    assert "9 ranks: refused — a world of 9 ranks cannot split optim.global_batch_size=8" in text
    r = subprocess.run([sys.executable, str(ROOT / "launchers/inspect_checkpoint.py"), str(saved), "--config", RECIPE,
                        "optim.global_batch_size=16"], capture_output=True, text=True, timeout=120)
    assert "CHANGED (global_batch 8→16, streams 8→16)" in r.stdout, r.stdout + r.stderr


def test_why_not_deepspeeds_universal_checkpoint(saved_by_two, tmp_path):
    """DeepSpeed's universal-checkpoint path (ds_to_universal, then load_universal) on the same 2-rank
    checkpoint: in the pinned DeepSpeed it gives every parameter group the first group's weight decay
    and one shared Adam step to all sub-groups. This is why the re-partitioning is ours (which the tests
    above show restores the run exactly); if it fails, DeepSpeed fixed both: reconsider using its path."""
    from xtra_ds.config import load_config

    from test_numerics import ds_case

    saved, _ = saved_by_two
    res = ds_case("universal", tmp_path, saved / "checkpoints/step_00000004", tmp_path)
    decay = load_config(RECIPE).optim.weight_decay
    assert res["saved_step"] == 4 and decay > 0
    # right would be [decay, 0.0] (the no-decay group) and [5.0, 5.0] (one step after step 4, per sub-group)
    assert res["weight_decay"] == [decay, decay], res
    assert res["steps"] == [6.0, 6.0], res  # one shared step tensor, incremented by both sub-groups
