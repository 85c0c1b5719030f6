"""The pre-training engine under the real `deepspeed` launcher: 2 CPU ranks, gloo, ZeRO-3, bf16,
activation checkpointing, a micro XTRA. Slowest tests of the suite (each launch ≈10 s of start-up)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xtra_ds.engine.dist import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = str(ROOT / "ds_configs/test_micro.yaml")  # bf16, ZeRO-3, activation checkpointing, 8 images per step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--out", str(d / "corpus"), "--n", "160",
                    "--size", "48"], check=True, capture_output=True, cwd=ROOT)
    from data_prep import shard as shard_tool
    assert shard_tool.main([str(d / "corpus"), "--output", str(d / "shards"), "--shard-samples", "20", "--workers",
                            "1"]) == 0
    return str(d / "shards" / "manifest.json")


def launch(run_dir, shards, steps, *extra, wait=True, env=None, gpus=2, port=None, **popen):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(gpus), "--master_port", str(port or free_port()),
           str(ROOT / "launchers/pretrain.py"), "--config", RECIPE, f"data.train={shards}", f"run_dir={run_dir}",
           f"schedule.total_steps={steps}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                            **popen)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # log steps (every step has a row)


def wait_for(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


FULL_RUN_PORT = free_port()


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    rc, out = launch(run_dir, shards, 12, port=FULL_RUN_PORT)
    assert rc == 0, out
    return run_dir, out


def test_cpu_ranks_leave_no_shared_memory_behind(full_run):
    """DeepSpeed's CPU all-reduce buffers (69 MB per rank in /dev/shm) are gone once a run has ended."""
    import deepspeed.accelerator

    assert deepspeed.accelerator.get_accelerator().device_name() == "cpu"
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{FULL_RUN_PORT}_*"))
    assert left == [], left


def test_trains_and_matches_plain_pytorch(full_run, shards):
    """Loss falls, and its first steps match a single-process plain-PyTorch run of the same
    train_step on the same global batches."""
    from xtra_ds.config import batch_plan, derive, load_config
    from xtra_ds.data.build import train_loader, training_data
    from xtra_ds.engine.builder import build_model
    from xtra_ds.engine.schedule import lr_at, param_groups
    from xtra_ds.engine.step import PlainEngine, micro_batches, train_step
    from xtra_ds.objective import NextBlockLoss

    run_dir, _ = full_run
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    assert sum(got[s] for s in (10, 11, 12)) < sum(got[s] for s in (1, 2, 3)), got

    cfg = load_config(RECIPE, [f"data.train={shards}", "data.num_workers=0"])
    data = training_data(cfg.data)
    # the 2-rank run's global batches — the same on one process (layout-free data order) — stepped on one process
    plan = derive(cfg, batch_plan(cfg.optim, 1), data.samples_per_pass)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, plan.sizes)
    with torch.no_grad():  # the engine's bf16 ZeRO-3 weights start as the bf16-rounded init
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)
    plain = PlainEngine(model, opt, accum=plan.batch.accum, grad_clip=cfg.optim.grad_clip)
    loader = iter(train_loader(cfg.data, data, seed=cfg.seed, rank=0, world_size=1,
                               global_batch=plan.batch.global_batch, img_size=plan.sizes.img_size))
    ref = []
    for step in range(5):
        lr = lr_at(step, total_steps=12, warmup_steps=2, peak_lr=cfg.optim.lr,
                   warmup_start_lr=cfg.schedule.warmup_start_lr, final_lr=cfg.schedule.final_lr)
        result = train_step(plain, micro_batches(next(loader), plan.batch), loss_fn=NextBlockLoss(), lr=lr,
                            order=None, device=torch.device("cpu"))
        ref.append(result.loss)
    engine = [got[s] for s in range(1, 6)]
    assert engine == pytest.approx(ref, rel=0.03), (engine, ref)  # bf16 compute vs fp32


def test_tensorboard_events(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = full_run
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    for t in ("train/loss", "train/lr", "train/grad_norm", "train/samples_seen", "train/epoch", "perf/images_per_sec",
              "perf/step_time", "perf/data_wait_fraction", "perf/peak_memory", "data/corrupt_skipped"):
        assert t in tags["scalars"], t
        assert [e.step for e in ea.Scalars(t)] == list(range(1, 13)), t
    assert "perf/mfu" not in tags["scalars"]  # no known peak for a CPU: omitted, not invented
    # loss by target block position (4 blocks: positions 1..3), every rank's step time and the slowest rank
    for t in ("train/loss_by_block/01", "train/loss_by_block/02", "train/loss_by_block/03",
              "perf/rank_step_time_min", "perf/rank_step_time_median", "perf/rank_step_time_max", "perf/slowest_rank"):
        assert [e.step for e in ea.Scalars(t)] == list(range(1, 13)), t
    assert "train/loss_by_block/04" not in tags["scalars"]
    assert {e.value for e in ea.Scalars("perf/slowest_rank")} <= {0, 1}
    assert [e.step for e in ea.Images("train/loss_by_block")] == list(range(1, 13))
    # attention health every 4 steps: each layer of the encoder (2) and predictor (2)
    for t in ("attn/max_logit", "attn/enc/max_logit/00", "attn/enc/entropy/01", "attn/pred/max_logit/01"):
        assert [e.step for e in ea.Scalars(t)] == [4, 8, 12], t
    assert all(0 < e.value < 100 for e in ea.Scalars("attn/max_logit"))
    assert [e.value for e in ea.Scalars("train/samples_seen")][-1] == 12 * 8
    assert [e.step for e in ea.Images("recon/train")] == [4, 8, 12]
    panel = ea.Images("recon/train")[0]  # input | target | predicted | error, titled, one row per image (4 here)
    assert (panel.width, panel.height) == (4 * 32 + 3 * 2, 14 + 4 * 32 + 3 * 2)
    assert "config/text_summary" in tags["tensors"]


def test_exports_and_consolidation(full_run, tmp_path):
    from safetensors.torch import load_file

    from xtra_ds.config import load_config, sizes_from_config
    from xtra_ds.engine.builder import build_model
    from xtra_ds.interop import consolidate

    run_dir, _ = full_run
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_00000004", "step_00000008",
                                                                       "step_00000012"]
    export = load_file(str(run_dir / "exports/step_00000012/encoder.safetensors"))
    meta = json.loads((run_dir / "exports/step_00000012/meta.json").read_text())
    assert meta["step"] == 12 and meta["samples_seen"] == 96
    n = consolidate(run_dir / "checkpoints/step_00000012", tmp_path / "full.safetensors")
    assert n == (tmp_path / "full.safetensors").stat().st_size
    full = load_file(str(tmp_path / "full.safetensors"))
    cfg = load_config(run_dir / "config.yaml")
    sizes = sizes_from_config(cfg.model, cfg.objective)
    model = build_model(cfg.model, sizes).eval()
    model.load_state_dict(full, strict=True)
    for k, v in export.items():  # the engine's own gathered fp32 weights
        assert torch.equal(full["enc." + k], v), k
    enc = build_model(cfg.model, sizes).enc.eval()
    enc.load_state_dict(export)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.enc(x), enc(x), rtol=0, atol=0)


def test_kill_9_one_rank_then_resume(full_run, shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 12, wait=False)
    wait_for(run_dir / "checkpoints/step_00000004/COMPLETE", proc)
    pid = int((run_dir / "pids/rank1.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    t = time.time()
    proc.communicate(timeout=120)  # the launcher notices and takes the other rank down: no hang
    assert proc.returncode != 0 and time.time() - t < 60
    assert not (run_dir / "checkpoints/step_00000012/COMPLETE").exists(), "the kill should land mid-run"
    resumed_from = max(int(p.parent.name[5:]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    rc, out = launch(run_dir, shards, 12)
    assert rc == 0, out
    assert f"resumed from {run_dir}/checkpoints/step_{resumed_from:08d}" in out
    want, got = losses(full_run[0]), losses(run_dir)
    for s in range(resumed_from + 1, 13):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s


def test_sigterm_saves_and_exits_zero(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 40, "checkpoint.every_steps=2", wait=False)
    wait_for(run_dir / "checkpoints/step_00000002/COMPLETE", proc)
    for r in (0, 1):
        os.kill(int((run_dir / f"pids/rank{r}.pid").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopping at step" in out and "checkpoint saved" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert stopped < 40 and (run_dir / f"checkpoints/step_{stopped:08d}/COMPLETE").exists()
    rc, out = launch(run_dir, shards, stopped + 2)
    assert rc == 0 and f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in out, out
    assert max(losses(run_dir)) == stopped + 2


def test_two_nodes_emulated(shards, tmp_path):
    run_dir = tmp_path / "run"
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()

    def two_nodes(steps):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                                   f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   str(ROOT / "launchers/pretrain.py"), "--config", RECIPE,
                                   f"data.train={shards}", f"run_dir={run_dir}", f"schedule.total_steps={steps}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                 for n in (0, 1)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        return outs[0]

    out = two_nodes(4)
    assert "on 2 ranks" in out and (run_dir / "checkpoints/step_00000004/COMPLETE").exists()
    out = two_nodes(6)
    assert f"resumed from {run_dir}/checkpoints/step_00000004" in out
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from xtra_ds.config.schema import CheckpointConfig, ConfigError
    from xtra_ds.engine.checkpoint import CheckpointManager
    from xtra_ds.engine.dist import RankInfo
    from xtra_ds.rundir import RunDir

    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        (root / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:08d}" / "COMPLETE").write_text("{}")
    m = CheckpointManager(RunDir(tmp_path), RankInfo(0, 0, 1),
                          CheckpointConfig(every_steps=4, every_minutes=0, keep_last=1), "cpu")
    assert m.find("auto") == root / "step_00000008"
    with pytest.raises(ConfigError, match="checkpoint.resume=none, but .* holds complete checkpoints"):
        m.find("none")  # a second timeline over the same steps is never started silently
    m.start_over = True
    assert m.find("none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        m.find(str(root / "step_00000012"))
    m._prune()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000012"]  # newer partial kept


@pytest.mark.parametrize("overrides,env,message", [
    (["optim.global_batch_size=2", "optim.micro_batch_size=2"], {"WORLD_SIZE": "3"},
     "a world of 3 ranks cannot split optim.global_batch_size=2"),
    (["data.train=/nonexistent/manifest.json"], {}, "no shard manifest at /nonexistent/manifest.json"),
    (["data.train=s3://bucket/train/manifest.json", "data.storage_options={endpoint_url: 'http://127.0.0.1:9'}"],
     {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}, "Is the storage reachable (http://127.0.0.1:9"),
    ([], {}, "data.train is empty"),
    (["run_dir=s3://bucket/runs/x"], {}, "run_dir=s3://bucket/runs/x: training writes its run directory through the "
                                         "filesystem"),
])
def test_config_errors_fail_fast(overrides, env, message):
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "launchers/pretrain.py"), "--config", RECIPE, "data.train=",
                        *overrides], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "training from step" not in r.stdout and time.time() - t < 90
    assert not (ROOT / "s3:").exists()  # not a local folder named "s3:" either


def test_nonfinite_steps_are_skipped_then_stop(shards, tmp_path):
    run_dir = tmp_path / "run"
    # an absurd learning rate: the first update blows the weights up, the losses after it are not finite
    rc, out = launch(run_dir, shards, 12, "optim.lr=1e30", "schedule.warmup_start_lr=1e30", "schedule.final_lr=1e30",
                     "checkpoint.every_steps=1", "checkpoint.export_every=0")
    assert rc != 0, out
    assert "non-finite loss or gradient norm at steps" in out and "The last complete checkpoint is untouched" in out
    assert "non-finite loss; update skipped (1 in a row" in out
    done = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    stopped = int(out.split("non-finite loss or gradient norm at steps ")[1].split("..")[1].split()[0])
    assert done and int(done[-1][5:]) < stopped - 2  # nothing saved once the numbers went bad


def test_sigterm_to_the_whole_job_still_checkpoints(shards, tmp_path):
    """Schedulers signal every process of a job: the launchers, the ranks and their loader workers
    (DeepSpeed's node launcher also SIGTERMs each rank's process tree). The workers must survive
    long enough for the ranks to reach a step boundary and save."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 40, "checkpoint.every_steps=0", "checkpoint.export_every=0", wait=False,
                  start_new_session=True)
    wait_for(run_dir / "metrics.jsonl", proc)
    while not (run_dir / "metrics.jsonl").read_text().strip():  # training has started (signal handlers are in)
        assert proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopping at step" in out and "checkpoint saved" in out, out
    assert list((run_dir / "checkpoints").glob("step_*/COMPLETE")), out


class Tampered:
    """An object whose unpickling runs code: it leaves a file behind when (and only when) unpickled."""

    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoints_are_read_without_unpickling_foreign_objects(full_run, tmp_path):
    """A checkpoint file carrying more than tensors and plain data (here: code that runs when unpickled)
    is refused by consolidation and by resume, and the code never runs."""
    import shutil

    from xtra_ds.config.schema import CheckpointConfig
    from xtra_ds.engine.checkpoint import CheckpointManager
    from xtra_ds.engine.dist import RankInfo
    from xtra_ds.interop import consolidate
    from xtra_ds.interop.zero import CheckpointFileError
    from xtra_ds.rundir import RunDir

    run_dir, _ = full_run
    ckpt = tmp_path / "checkpoints/step_00000012"
    shutil.copytree(run_dir / "checkpoints/step_00000012", ckpt)
    consolidate(ckpt, tmp_path / "ok.safetensors")  # the genuine files read fine
    Tampered.marker = str(tmp_path / "pwned")
    optim = next(ckpt.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    torch.save({"optimizer_state_dict": Tampered()}, optim)
    with pytest.raises(CheckpointFileError, match="cannot be read safely"):
        consolidate(ckpt, tmp_path / "out.safetensors")
    torch.save(Tampered(), ckpt / "rng_rank0.pt")

    class Engine:  # DeepSpeed's own load must not even be reached
        def load_checkpoint(self, *a, **kw):
            raise AssertionError("DeepSpeed's unpickler was reached")

    manager = CheckpointManager(RunDir(tmp_path), RankInfo(0, 0, 1), CheckpointConfig(), "cpu")
    with pytest.raises(CheckpointFileError, match="rng_rank0.pt: cannot be read safely"):
        manager.load(Engine(), ckpt)
    assert not (tmp_path / "pwned").exists()


def test_a_kill_between_export_and_checkpoint_loses_no_export(full_run, shards, tmp_path):
    """Killed right after publishing an export and before its checkpoint (step 8), then right after the
    final step's checkpoint (step 12): every export is there in the end, the final one marked final, and
    the losses are those of an uninterrupted run. (Checkpointing first once lost the final export for
    good: the resume found step 12 done and had nothing left to do.)"""
    run_dir = tmp_path / "run"
    rc, out = launch(run_dir, shards, 12, env={**os.environ, "XTRA_FAULT": "after_export@8"})
    assert rc != 0 and (run_dir / "exports/step_00000008/meta.json").exists()
    assert not (run_dir / "checkpoints/step_00000008/COMPLETE").exists()
    rc, out = launch(run_dir, shards, 12, env={**os.environ, "XTRA_FAULT": "after_checkpoint@12"})
    assert rc != 0 and f"resumed from {run_dir}/checkpoints/step_00000004" in out, out
    rc, out = launch(run_dir, shards, 12)
    assert rc == 0 and "already at step 12 of 12" in out, out
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_00000004", "step_00000008",
                                                                       "step_00000012"]
    assert json.loads((run_dir / "exports/step_00000012/meta.json").read_text())["final"] is True
    want, got = losses(full_run[0]), losses(run_dir)
    for s in range(5, 13):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s


def test_sigterm_during_start_up_stops_cleanly(shards, tmp_path):
    """A preemption notice while the ranks are still building (the handlers are the first thing installed)
    is kept: the run stops before its first step, exit status 0, instead of dying mid-build."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 12, wait=False)
    for r in (0, 1):
        wait_for(run_dir / f"pids/rank{r}.pid", proc)
    for r in (0, 1):
        os.kill(int((run_dir / f"pids/rank{r}.pid").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopping before the first step on SIGTERM" in out
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*"))


def test_a_signal_during_a_non_finite_step_does_not_claim_a_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = launch(run_dir, shards, 12, "optim.lr=1e30", "schedule.warmup_start_lr=1e30", "schedule.final_lr=1e30",
                     "checkpoint.every_steps=1", "checkpoint.export_every=0",
                     env={**os.environ, "XTRA_FAULT": "RANK=0:step_start@2=USR1"})
    assert rc == 0, out
    assert "stopping at step 2 on SIGUSR1: NOT saved, the last step was not finite" in out
    assert "checkpoint saved" not in out.split("stopping at step 2")[1]
    assert sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE")) == ["step_00000001"]


def test_ranks_draw_their_own_random_numbers(full_run):
    """Stochastic depth and dropout must differ between ranks (each rank seeds torch with its own seed): the
    generators the ranks saved at the same step are different. (All ranks once seeded torch alike, so sample i
    of every rank dropped the same blocks.)"""
    from xtra_ds.interop.zero import safe_load

    run_dir, _ = full_run
    ckpt = run_dir / "checkpoints/step_00000012"
    states = [safe_load(ckpt / f"rng_rank{r}.pt", mmap=False)["torch"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])


def test_a_non_finite_micro_batch_on_one_rank_skips_the_step_everywhere(shards, tmp_path):
    """One image of rank 1's second micro batch is NaN at step 5: every rank skips the update, and the optimizer
    state saved after step 6 has taken 5 steps, not 6 (a skip used to step Adam with lr 0)."""
    from xtra_ds.interop import ZeroCheckpoint

    run_dir = tmp_path / "run"
    rc, out = launch(run_dir, shards, 6, "optim.micro_batch_size=2", "checkpoint.every_steps=1",
                     "checkpoint.export_every=0", "logging.recon_every=0",
                     env={**os.environ, "XTRA_FAULT": "RANK=1:nan_sample@5"})
    assert rc == 0, out
    assert "step 5: non-finite loss; update skipped (1 in a row, 1 in all; weights and optimizer state unchanged)" \
        in out, out
    assert "step 6: non-finite" not in out and "micro-batches of 2" in out
    for step, adam_steps in ((4, 4), (6, 5)):
        ckpt = ZeroCheckpoint(run_dir / f"checkpoints/step_{step:08d}")
        for rank in (0, 1):
            state = ckpt.optim(rank)["optimizer_state_dict"]["state"]
            assert {float(s["step"]) for s in state.values()} == {adam_steps}, (step, rank)
    assert not (run_dir / "checkpoints/step_00000005/COMPLETE").exists()  # nothing is published after a skip


def test_a_stop_signal_during_the_imports_is_kept(shards, tmp_path):
    """SIGUSR1 (a Slurm preemption notice) reaching a rank while it still imports torch and DeepSpeed — before
    it has even written its pid file — is kept: the rank stops before its first step and exits 0 (it used to
    die of the signal, failing a job that should requeue)."""
    import psutil

    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 12, wait=False, gpus=1)
    deadline, rank = time.time() + 60, None
    while rank is None:
        assert proc.poll() is None and time.time() < deadline
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "--local_rank=0" in " ".join(child.cmdline()) and "pretrain.py" in " ".join(child.cmdline()):
                    rank = child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.01)
    time.sleep(0.3)  # the rank's interpreter is up and importing
    assert not (run_dir / "pids/rank0.pid").exists()  # still in its imports
    rank.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopping before the first step on SIGUSR1" in out
    assert json.loads((run_dir / "state.json").read_text())["status"] == "stopped"


def test_rolling_back_sets_the_newer_timeline_aside(full_run, shards, tmp_path):
    """Resuming from step 4 of a run that reached step 12, killed after step 8: the old steps 8 and 12
    (checkpoints, exports) move to abandoned-<time>/, so a later resume=auto continues the new timeline from its
    step 8 — not the old step 12, which would have said "already at step 12". A temporary export folder left
    by a kill is removed at start."""
    import shutil

    run_dir = tmp_path / "run"
    for part in ("checkpoints", "exports"):
        shutil.copytree(full_run[0] / part, run_dir / part)
    (run_dir / "exports/.step_00000016.tmp-999999").mkdir()
    rc, out = launch(run_dir, shards, 12, f"checkpoint.resume={run_dir}/checkpoints/step_00000004",
                     env={**os.environ, "XTRA_FAULT": "after_checkpoint@8"})
    assert rc != 0 and (run_dir / "checkpoints/step_00000008/COMPLETE").exists(), out
    assert "a new timeline starts after step 4; set aside what the old one had after it" in out
    assert "removed .step_00000016.tmp-999999, left by a run killed while exporting" in out
    aside = next((run_dir / "checkpoints").glob("abandoned-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000008", "step_00000012"]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"  # killed: it could not say
    rc, out = launch(run_dir, shards, 12)
    assert rc == 0 and f"resumed from {run_dir}/checkpoints/step_00000008" in out, out
    want, got = losses(full_run[0]), losses(run_dir)
    for s in range(5, 13):  # the new timeline trains the same batches from the same state
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s


def test_a_stopped_rank_is_reported_and_the_job_exits_for_requeue(shards, tmp_path):
    """Rank 1 stops dead (SIGSTOP) at the start of step 5. Rank 0 waits in its next collective; its hang watchdog
    (a 5 s timeout here) writes its stacks to incidents/hang_00000005/rank0.txt, names rank 1 as the one that wrote
    none, and the job exits 75 (the code the Slurm script requeues) instead of waiting out the process group's
    timeout."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    rc, out = launch(run_dir, shards, 12, "incidents.hang_timeout_s=5", "checkpoint.every_steps=3",
                     env={**os.environ, "XTRA_FAULT": "RANK=1:step_start@5=STOP"})
    assert rc == 75, out
    assert time.monotonic() - t0 < 300
    stacks = (run_dir / "incidents/hang_00000005/rank0.txt").read_text()
    assert "no step completed for" in stacks and "while on step 5" in stacks
    assert "train_step" in stacks  # where rank 0 waited: inside the step, in a collective
    assert not (run_dir / "incidents/hang_00000005/rank1.txt").exists()
    assert "ranks [0] wrote their stacks" in out and "ranks [1] did not" in out, out
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"  # not done: resumable
    assert (run_dir / "checkpoints/step_00000003/COMPLETE").exists()


def test_every_step_logs_the_digest_inspect_batch_confirms(full_run):
    """metrics.jsonl has a row for every step with the digest of the keys the two ranks trained on (summed over
    them in the step's all-reduce), and launchers/inspect_batch.py, working from config.yaml and the shards'
    stats alone, lists for each of the 12 steps exactly those keys ("the same")."""
    import importlib.util

    from xtra_ds.config.parse import config_from_dict
    from xtra_ds.rundir import RunDir

    run_dir, _ = full_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    spec = importlib.util.spec_from_file_location("inspect_batch", ROOT / "launchers/inspect_batch.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import yaml

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    for step in range(1, 13):
        lines = tool.describe_step(RunDir(str(run_dir)), cfg, step)
        assert any("the same: the run trained on exactly these keys" in line for line in lines), (step, lines)
        assert sum(not line.startswith("#") for line in lines) == 8  # 8 images per step


def test_the_console_holds_the_runs_own_lines_and_the_rank_logs_the_rest(full_run):
    """A quiet console: the ranks print the run's own lines (and errors) only; DeepSpeed's INFO lines, torch's
    FutureWarnings and the JIT compiler's lines go to run_dir/logs/rank<R>.log, in full. What remains from
    DeepSpeed on the console is its launcher's (and, on a CPU, the accelerator notice each rank prints while it
    imports DeepSpeed, before any logging is set up)."""
    import re

    run_dir, out = full_run
    library = [line for line in out.splitlines() if re.match(r"\[20\d\d-", line)]
    assert all(re.search(r"\] \[(runner|launch|real_accelerator)\.py:", line) for line in library), library
    assert "FutureWarning" not in out and "built successfully" not in out and " gcc " not in out, out
    log0 = (run_dir / "logs/rank0.log").read_text()
    assert "FutureWarning" in log0 and "built successfully" in log0 and "step 12/12" in log0
    assert "FutureWarning" in (run_dir / "logs/rank1.log").read_text()
