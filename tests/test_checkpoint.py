"""The checkpoint manager's bookkeeping without DeepSpeed: a tag saved again, re-partitioned copies, rollbacks
and starting over (fast; the same paths under the launcher are in tests/test_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xtra_ds.config.schema import CheckpointConfig, ConfigError
from xtra_ds.engine.checkpoint import CheckpointManager
from xtra_ds.engine.dist import RankInfo
from xtra_ds.rundir import ExportMeta, RunDir, write_export


def complete(root: Path, step: int, **meta) -> Path:
    """A checkpoint folder of ``step`` with a file and its COMPLETE marker."""
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"old")
    (path / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2, "time": 1.0, **meta}))
    return path


def manager(root: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(RunDir(root), RankInfo(0, 0, 1), CheckpointConfig(every_minutes=0, **cfg), "cpu")


class DyingEngine:
    """DeepSpeed's save_checkpoint, killed after writing part of its files."""

    def save_checkpoint(self, root, tag, **kw):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"new, half written")
        raise KeyboardInterrupt("killed mid-save")


def test_a_tag_saved_again_never_keeps_its_old_marker(tmp_path):
    """A checkpoint folder saved a second time (say after a resume from an earlier step) loses its COMPLETE —
    and its re-partitioned copies — before any new file lands: a save killed midway leaves an incomplete
    folder that resume ignores, never an old marker vouching for a mix of two saves."""
    old = complete(tmp_path, 8)
    (old / "world_1").mkdir()
    (old / "world_1" / "COMPLETE").write_text("{}")
    m = manager(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        m.save(DyingEngine(), 8, {"step": 8})
    assert not (old / "COMPLETE").exists() and not (old / "world_1").exists()
    assert (old / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes() == b"new, half written"
    assert m.find("auto") is None


def test_a_repartitioned_copy_is_made_again_for_another_save(tmp_path, monkeypatch):
    """``step_X/world_W/`` records which save of ``step_X`` it was made from; a copy of an earlier save is
    rebuilt, a copy of this one reused."""
    import xtra_ds.interop as interop

    path = complete(tmp_path, 8)
    made = []

    def reshard_rank(ckpt, world, rank, out, sub_group_size):
        made.append(str(out))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "optim.pt").write_text(f"from {(path / 'COMPLETE').read_text()}")

    class Engine:
        def zero_optimization_stage(self):
            return 3

        def zero_sub_group_size(self):
            return 0

    monkeypatch.setattr(interop, "reshard_rank", reshard_rank)
    monkeypatch.setattr(interop, "ZeroCheckpoint", lambda folder: folder)
    m = manager(tmp_path)
    assert m._resharded(Engine(), path, 2) == path / "world_1" and len(made) == 1
    assert m._resharded(Engine(), path, 2) == path / "world_1" and len(made) == 1  # the same save: reused
    complete(tmp_path, 8, time=2.0)  # the tag saved again
    stale = path / "world_1" / "stale-file"
    stale.write_text("from the first save")
    m._resharded(Engine(), path, 2)
    assert len(made) == 2 and not stale.exists()
    assert "time\": 2.0" in (path / "world_1" / "optim.pt").read_text()


def test_rollback_sets_the_abandoned_timeline_aside(tmp_path):
    """Resuming from an older checkpoint than the newest: the newer checkpoints, their exports, eval records
    and metrics rows move to abandoned-<time>/ folders; resume=auto and keep-last-k then see only the new
    timeline, and ``latest`` names the checkpoint resumed from."""
    for step in (4, 8, 12):
        complete(tmp_path, step)
        write_export(tmp_path, step, {}, ExportMeta(final=step == 12))
        for area in ("eval/ledger/digits", "eval/results/digits"):
            (tmp_path / area).mkdir(parents=True, exist_ok=True)
            (tmp_path / area / f"step_{step:08d}.json").write_text(json.dumps({"step": step}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 13)))
    m = manager(tmp_path, keep_last=1)
    resume = m.find(str(tmp_path / "checkpoints/step_00000004"))
    m.abandon_after(resume)
    aside = list((tmp_path / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000008", "step_00000012"]
    assert [Path(p).name for p in RunDir(tmp_path).complete_checkpoints()] == ["step_00000004"]
    assert sorted(p.name for p in (tmp_path / "exports").iterdir() if not p.name.startswith("abandoned-")) == \
        ["step_00000004"]
    for area in ("eval/ledger/digits", "eval/results/digits"):
        assert sorted(p.name for p in (tmp_path / area).iterdir()) == ["step_00000004.json"]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000004"
    assert m.find("auto") == tmp_path / "checkpoints/step_00000004"
    complete(tmp_path, 8)  # the new timeline's step 8; keep_last=1 prunes its step 4, nothing of the old one
    m._prune()
    assert [Path(p).name for p in RunDir(tmp_path).complete_checkpoints()] == ["step_00000008"]
    assert (aside[0] / "step_00000012" / "COMPLETE").exists()


def test_resume_none_is_refused_where_checkpoints_are_unless_starting_over(tmp_path):
    complete(tmp_path, 4)
    with pytest.raises(ConfigError, match="checkpoint.start_over=true"):
        manager(tmp_path, resume="none").find()
    m = manager(tmp_path, resume="none", start_over=True)
    assert m.find() is None
    m.abandon_after(None)
    assert RunDir(tmp_path).complete_checkpoints() == []
    assert (next((tmp_path / "checkpoints").glob("abandoned-*")) / "step_00000004" / "COMPLETE").exists()
    assert manager(tmp_path, resume="none").find() is None  # nothing left to mix with


def test_a_plain_resume_sets_nothing_aside(tmp_path):
    for step in (4, 8):
        complete(tmp_path, step)
    m = manager(tmp_path)
    m.abandon_after(m.find())
    assert not list(tmp_path.glob("**/abandoned-*"))


def inspect_lines(ckpt: Path, worlds: list[int], overrides: list[str] | None = None) -> str:
    import importlib.util

    from xtra_ds.config import load_config

    spec = importlib.util.spec_from_file_location("inspect_checkpoint", Path(__file__).parents[1] /
                                                  "launchers/inspect_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = load_config(Path(__file__).parents[1] / "ds_configs/test_micro.yaml", overrides) if overrides is not None \
        else None
    return "\n".join(tool.describe(ckpt, worlds, cfg))


SAVED_DATA = {"epoch": 0, "step": 3, "steps_per_epoch": 20, "global_batch": 8, "streams": 8, "seed": 1,
              "shards": "0123456789abcdef", "weights": None, "shuffle": 16}


def test_inspect_checkpoint_refuses_what_resume_refuses(tmp_path):
    """A ZeRO-1/2 checkpoint on another world size, a planned config of another ZeRO stage, and a changed
    shuffle buffer or source weights are reported as the resume will treat them."""
    ckpt = complete(tmp_path, 3, zero_stage=2, precision="bf16", global_batch=8, data=SAVED_DATA,
                    layout={"world_size": 2, "micro_batch": 4, "accum": 1, "loader_workers": 1})
    text = inspect_lines(ckpt, [1, 2], ["deepspeed.zero_stage=2"])
    assert "1 ranks: refused — a ZeRO-2 checkpoint is re-partitioned only at stage 3: resume it on 2 ranks" in text
    assert "2 ranks: exact" in text
    text = inspect_lines(ckpt, [2], [])  # the recipe's ZeRO-3
    assert "2 ranks: refused — the planned config uses ZeRO-3, the checkpoint was saved by ZeRO-2" in text
    text = inspect_lines(ckpt, [2], ["deepspeed.zero_stage=2", "data.shuffle_buffer=32"])
    assert "CHANGED (shuffle 16→32)" in text and "shard list was not checked" in text
    text = inspect_lines(ckpt, [], ["deepspeed.zero_stage=2", "data.sources=[{url: a/manifest.json, weight: 2}]"])
    assert "CHANGED (weights None→[2.0])" in text
    assert "data order of the planned config: the same" in inspect_lines(ckpt, [], ["deepspeed.zero_stage=2"])
