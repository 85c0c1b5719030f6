"""Replaying a step of a real 2-rank fp32 run (launchers/replay.py), and quarantining the sample it blames.

One run under the launcher (10 steps, checkpoints after 4, 8 and 10) on digits where one image — placed in
step 10 — is a black-and-white checkerboard; one resume of a copy of it with that sample quarantined."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.forensics import corpus_with_outlier
from test_engine import RECIPE, ROOT, launch, losses

pytestmark = pytest.mark.slow

STEP = 10  # the replayed step: the last of the run, replayed from the checkpoint of step 8
FP32 = ("deepspeed.precision=fp32", "checkpoint.every_steps=4", "checkpoint.export_every=0", "logging.recon_every=0",
        "logging.attn_every=0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_with_outlier(tmp_path_factory.mktemp("forensics"), RECIPE, STEP)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("replay") / "run"
    rc, out = launch(run_dir, corpus[0], STEP, *FP32)
    assert rc == 0, out
    assert sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE")) == \
        ["step_00000004", "step_00000008", "step_00000010"]
    return run_dir


@pytest.fixture(scope="module")
def replayed(run, tmp_path_factory):
    """launchers/replay.py on step 10, writing the worst key to a quarantine file: (report, stdout, the file)."""
    out = tmp_path_factory.mktemp("replayed")
    quarantine = out / "lists" / "quarantine.txt"  # a folder that does not exist yet
    r = subprocess.run([sys.executable, str(ROOT / "launchers/replay.py"), str(run), "--step", str(STEP),
                        "--json", str(out / "report.json"), "--write-quarantine", str(quarantine), "--top", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((out / "report.json").read_text()), r.stdout, quarantine


def test_replay_reproduces_the_logged_step_and_blames_the_outlier(run, corpus, replayed):
    """Steps 9 and 10 replayed on one process from the checkpoint of step 8 give the losses and gradient norms
    the 2-rank run logged (fp32: to 1e-6), and step 10's worst sample is the checkerboard, with its shard."""
    report, stdout, quarantine = replayed
    manifest, outlier = corpus
    logged = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert report["checkpoint"] == "checkpoints/step_00000008" and [s["step"] for s in report["steps"]] == [9, 10]
    for s in report["steps"]:
        assert s["loss"] == pytest.approx(logged[s["step"]]["train/loss"], rel=1e-6, abs=0), s
        assert s["grad_norm"] == pytest.approx(logged[s["step"]]["train/grad_norm"], rel=1e-5), s
        assert not s["skipped"]
    samples = report["samples"]
    assert len(samples) == 8 and [r["loss"] for r in samples] == sorted((r["loss"] for r in samples), reverse=True)
    assert sum(r["loss"] for r in samples) / 8 == pytest.approx(report["steps"][-1]["loss"], rel=1e-5)
    worst = samples[0]
    assert worst["key"] == outlier, stdout
    assert worst["loss"] > samples[1]["loss"] + 0.02, stdout  # first by a margin, not by rounding
    assert worst["min"] == 0 and worst["max"] == 255 and worst["saturated"] > 0.5
    assert worst["saturated"] == max(r["saturated"] for r in samples)
    from xtra_ds.data.shards import shard_stats

    assert outlier in {k for k, *_ in shard_stats(worst["shard"])["samples"]}  # the shard holding it
    assert all(r["shard"] != "?" for r in samples)
    assert f"step 10 (epoch 0, step 10 of it): loss {report['steps'][-1]['loss']:.8f}" in stdout
    assert quarantine.read_text() == f"{outlier} {worst['shard']}\n"
    assert f"added 1 key(s) ({outlier})" in stdout


def test_writing_the_quarantine_again_adds_no_duplicate(replayed):
    from xtra_ds.data.quarantine import add_to_quarantine, read_quarantine

    report, _, quarantine = replayed
    copy = quarantine.with_name("again.txt")
    shutil.copy(quarantine, copy)
    worst = report["samples"]
    assert add_to_quarantine(str(copy), [(worst[0]["key"], worst[0]["shard"]), (worst[1]["key"], None)]) == \
        [worst[1]["key"]]
    assert add_to_quarantine(str(copy), [(worst[1]["key"], worst[1]["shard"])]) == []
    assert read_quarantine(str(copy)) == {worst[0]["key"]: worst[0]["shard"], worst[1]["key"]: None}


def test_the_consolidated_optimizer_is_the_checkpoints_and_steps_like_the_engine(run):
    """The plain AdamW holds exactly the checkpoint's fp32 master weights, both moments and step count of
    every parameter, in param_groups' groups with the saved settings; two replayed steps then give the
    weights, moments and step count the engine saved after step 10 (fp32), which differ from step 8's."""
    from xtra_ds.engine.replay import Replay
    from xtra_ds.engine.schedule import decays
    from xtra_ds.interop import ZeroCheckpoint

    replay = Replay(run, STEP)
    params, optimizer = dict(replay.model.named_parameters()), replay.engine.optimizer
    saved = ZeroCheckpoint(run / "checkpoints/step_00000008")
    groups = saved.optimizer_groups()
    assert len(optimizer.param_groups) == len(groups) == 2
    for mine, theirs in zip(optimizer.param_groups, groups, strict=True):
        names = {n for n, p in params.items() if any(p is q for q in mine["params"])}
        assert names == {name for name, *_ in theirs["params"]}
        assert mine["weight_decay"] == theirs["settings"]["weight_decay"] and tuple(mine["betas"]) == (0.9, 0.95)
        assert all(decays(n, params[n]) == (mine["weight_decay"] > 0) for n in names)

    def compare(ckpt: ZeroCheckpoint, exact: bool) -> None:
        for group in ckpt.optimizer_groups():
            for name, shape, sub, offset in group["params"]:
                p = params[name]
                state = optimizer.state[p]
                assert float(state["step"]) == group["steps"][0], name
                for key, mine in (("fp32", p.detach()), ("exp_avg", state["exp_avg"]),
                                  ("exp_avg_sq", state["exp_avg_sq"])):
                    want = ckpt.full(sub, offset, shape, key)
                    if exact:
                        assert torch.equal(mine, want), (name, key)
                    else:
                        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")

    compare(saved, exact=True)
    assert {g["steps"][0] for g in groups} == {8.0}
    before = {n: p.detach().clone() for n, p in params.items()}
    replay.run()
    after = ZeroCheckpoint(run / "checkpoints/step_00000010")
    compare(after, exact=False)
    assert {g["steps"][0] for g in after.optimizer_groups()} == {10.0}
    assert all(not torch.equal(before[n], p) for n, p in params.items())  # the replay did move every weight


@pytest.fixture(scope="module")
def resumed(run, corpus, replayed, tmp_path_factory):
    """A copy of the run resumed to step 12 with the quarantine file the replay wrote: (run directory, output)."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(run, run_dir)
    rc, out = launch(run_dir, corpus[0], STEP + 2, *FP32, f"data.quarantine={replayed[2]}",
                     "data.on_order_change=next_epoch")
    assert rc == 0, out
    return run_dir, out


def loader_of(run_dir, *overrides):
    """The training loader of a run directory's config.yaml (with overrides) on one process."""
    from xtra_ds.config import load_config
    from xtra_ds.data.build import train_loader, training_data

    cfg = load_config(run_dir / "config.yaml", ["data.num_workers=0", *overrides])
    return train_loader(cfg.data, training_data(cfg.data), seed=cfg.seed, rank=0, world_size=1,
                        global_batch=cfg.optim.global_batch_size, img_size=cfg.model.img_size)


def test_a_quarantined_sample_is_left_out_from_the_next_resume(run, corpus, replayed, resumed):
    """The quarantine file the replay wrote changes the data order: a resume across it is refused, naming the
    quarantine; with data.on_order_change=next_epoch the run goes on at the next epoch, and the loader never
    yields the key again (while it still yields every other sample once per epoch)."""
    from xtra_ds.data.train_loader import DataOrderChanged
    from xtra_ds.interop import ZeroCheckpoint

    _, outlier = corpus
    _, _, quarantine = replayed
    run_dir, out = resumed
    saved = ZeroCheckpoint(run / "checkpoints/step_00000010").meta["loader"]
    with pytest.raises(DataOrderChanged, match=rf"another data order \(shards {saved['shards']}→"
                                               rf"{saved['shards']}\+quarantine\(1 key [0-9a-f]{{8}}\)\)"):
        loader_of(run, f"data.quarantine={quarantine}").load_state_dict(saved)  # what a resume's restore does

    assert f"quarantine {quarantine}: 1 keys excluded (1 of them in the training data" in out
    assert "continuing at the start of epoch 1; the rest of epoch 0 is not read" in out
    assert sorted(losses(run_dir)) == list(range(1, STEP + 3))
    state = ZeroCheckpoint(run_dir / "checkpoints/step_00000012").meta["loader"]
    assert (state["epoch"], state["step"]) == (1, 2) and "+quarantine(1 key" in state["shards"]

    def epoch_1(loader) -> list[str]:
        it = iter(loader)
        assert loader.epoch == 1
        return [k for _ in range(loader.steps_per_epoch()) for k in next(it)["keys"]]

    quarantined = loader_of(run_dir)  # config.yaml is the resumed run's: the quarantine, next_epoch
    quarantined.load_state_dict(saved)  # the resume above, on one process: the same global batches
    plain = loader_of(run_dir, "data.quarantine=", "data.on_order_change=refuse")
    plain.load_state_dict({**saved, "epoch": 1, "step": 0})
    kept, every = epoch_1(quarantined), epoch_1(plain)
    assert outlier in every and outlier not in kept
    assert len(kept) == len(set(kept)) and set(kept) < set(every) and len(every) == 160


def test_replaying_across_the_quarantine(corpus, resumed):
    """After the resume with the quarantine, step 12 replays from the checkpoint of step 10 the way the run went on
    (the next epoch, in the new order) and matches the logged losses; a step trained before the quarantine is
    refused until the settings of that time are given back — the quarantine and the run's length then."""
    from xtra_ds.engine.replay import Replay, ReplayError

    _, outlier = corpus
    run_dir, _ = resumed
    logged = losses(run_dir)
    after = Replay(run_dir, STEP + 2).run()
    assert [(s.step, s.epoch) for s in after.steps] == [(11, 1), (12, 1)]
    assert all(s.loss == pytest.approx(logged[s.step], rel=1e-6) for s in after.steps), after.text()
    assert outlier not in {r.key for r in after.samples}
    assert any("went on from step_00000010 in another data order" in n for n in after.notes)

    with pytest.raises(ReplayError, match=r"step_00000008 holds a data position in another order .*quarantine\(1 key"):
        Replay(run_dir, STEP)
    longer = Replay(run_dir, STEP, overrides=["data.quarantine="]).run()  # config.yaml says 12 steps now
    assert any("the run logged" in n and "schedule.total_steps=10" in n for n in longer.notes), longer.notes
    before = Replay(run_dir, STEP, overrides=["data.quarantine=", "schedule.total_steps=10"]).run()
    assert not before.notes and before.samples[0].key == outlier
    assert all(s.loss == pytest.approx(logged[s.step], rel=1e-6) for s in before.steps), before.text()


def test_a_non_finite_image_is_named_by_its_incident_quarantined_and_left_out(corpus, tmp_path):
    """One image of rank 1 turns NaN at step 5 (XTRA_FAULT nan_sample): the step is skipped everywhere and its
    incident record names that image — the first of rank 1's last micro batch, as the step's listing orders them.
    launchers/quarantine.py --incident puts it, with its shard, in a quarantine file; the run resumed with it
    (next_epoch) goes on finite through the next epoch, which never holds the key — the digests the run logged
    say so, step by step, as well as the listing."""
    import importlib.util

    import yaml

    from xtra_ds.config.parse import config_from_dict
    from xtra_ds.rundir import RunDir

    run_dir, quarantine = tmp_path / "run", tmp_path / "quarantine.txt"
    micro = ("optim.micro_batch_size=2", "logging.attn_every=0")  # rank 1: 2 micro batches of 2 (positions 4-7)
    rc, out = launch(run_dir, corpus[0], 8, *FP32, *micro, env={**os.environ, "XTRA_FAULT": "RANK=1:nan_sample@5"})
    assert rc == 0, out
    record = json.loads((run_dir / "incidents/step_00000005.json").read_text())
    assert record["kind"] == "non-finite" and record["skipped"] and len(record["samples"]) == 8
    nan = [s for s in record["samples"] if s["loss"] is None]
    assert len(nan) == 1 and nan[0]["rank"] == 1 and record["samples"][0] == nan[0], record
    assert "step 5: non-finite (skipped; worst image " + nan[0]["key"] in out, out

    spec = importlib.util.spec_from_file_location("inspect_batch", ROOT / "launchers/inspect_batch.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def listing(step):
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        lines = tool.describe_step(RunDir(str(run_dir)), cfg, step)
        assert any("the same: the run trained on exactly these keys" in line for line in lines), (step, lines)
        return [line.split("\t") for line in lines if not line.startswith("#")]

    key, shard, _ = listing(5)[6]  # rank 1's positions 4..7; its last micro batch 6, 7; the poisoned one first
    assert key == nan[0]["key"]

    r = subprocess.run([sys.executable, str(ROOT / "launchers/quarantine.py"), str(quarantine), "--incident",
                        str(run_dir / "incidents/step_00000005.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and f"added 1 key(s) ({key})" in r.stdout, r.stdout + r.stderr
    assert quarantine.read_text() == f"{key} {shard}\n"

    total = 8 + 19  # epoch 1 (20 steps of 160 digits; 19 with one left out) starts at step 9
    rc, out = launch(run_dir, corpus[0], total, *FP32, *micro, f"data.quarantine={quarantine}",
                     "data.on_order_change=next_epoch")
    assert rc == 0, out
    assert f"quarantine {quarantine}: 1 keys excluded" in out and "non-finite" not in out, out
    logged = losses(run_dir)
    assert sorted(s for s in logged if s > 8) == list(range(9, total + 1))
    assert all(math.isfinite(logged[s]) for s in range(9, total + 1))
    for step in range(13, total + 1):  # counted from the first checkpoint in the new order (step 12)
        assert key not in [k for k, _, _ in listing(step)], step
