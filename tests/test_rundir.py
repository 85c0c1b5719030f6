"""The run directory (xtra_ds/rundir.py): its listings, how its files are put in place, and its typed JSON records,
which must read what earlier code wrote and keep what later code adds."""

from __future__ import annotations

import json

import pytest

from xtra_ds.eval.ledger import Ledger
from xtra_ds.rundir import (
    STATE,
    CheckpointRecord,
    ExportMeta,
    LedgerEntry,
    RepartitionRecord,
    RunDir,
    TrainingState,
    ledger_record,
)

from helpers.exports import export_of, tiny_encoder

# --- listings and publishing -------------------------------------------------------------------


def test_ledger_records_are_whole_objects(tmp_path):
    run = RunDir(str(tmp_path))
    led = Ledger(run)
    led.append(LedgerEntry(step=5, dataset="d", status="done"))
    led.append(LedgerEntry(step=10, dataset="d", status="failed", reason="x"))
    led.append(LedgerEntry(step=10, dataset="d", status="done"))  # --retry-failed: the new outcome replaces the old
    (tmp_path / "eval/ledger/d/.step_00000015.json.tmp-99").write_text('{"step": 15, "da')  # a write cut by a kill
    again = Ledger(run)
    assert {s: e.status for s, e in again.outcomes("d").items()} == {5: "done", 10: "done"}
    assert again.outcomes("other") == {}
    assert sorted(p.name for p in (tmp_path / "eval/ledger/d").glob("step_*")) == ["step_00000005.json",
                                                                                  "step_00000010.json"]


def test_exports_listing_ignores_temporary_and_incomplete(tmp_path):
    for step in (100, 50):
        export_of(tmp_path, step, tiny_encoder())
    (tmp_path / "exports/.step_00000150.tmp-123").mkdir()
    (tmp_path / "exports/.step_00000150.tmp-123/meta.json").write_text("{}")
    (tmp_path / "exports/step_00000200").mkdir()
    (tmp_path / "exports/step_00000200/meta.json").write_text("{}")  # object-store style: encoder not there yet
    done, partial = RunDir(str(tmp_path)).exports()
    assert done == [50, 100] and partial == ["step_00000200"]


def test_re_export_is_atomic_for_readers(tmp_path):
    """A reader of an export never finds it missing while the same step is exported again (a resume
    replays the steps since the last checkpoint): the new folder is swapped in, not deleted first."""
    import threading

    enc = tiny_encoder()
    export_of(tmp_path, 7, enc)
    meta = tmp_path / "exports/step_00000007/meta.json"
    missing, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                json.loads(meta.read_text())
            except FileNotFoundError:
                missing.append(1)
            except ValueError:  # never a torn file either
                missing.append("torn")

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(40):
        export_of(tmp_path, 7, enc)
    stop.set()
    reader.join()
    assert missing == []
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["step_00000007"]


# --- records written before the typed records ---------------------------------------------------
# Literal JSON as the code wrote it before xtra_ds.rundir's Record classes (no "version" field): a run started
# then is resumed, inspected and evaluated by the code of now.

LAYOUT = {"world_size": 2, "micro_batch": 4, "accum": 1, "loader_workers": 2}
DATA = {"epoch": 0, "step": 8, "steps_per_epoch": 28, "global_batch": 8, "streams": 4, "seed": 0,
        "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"], "weights": None, "shuffle": 256}
SIZES = {"img_size": 32, "patch_size": 8, "block_size": 2, "in_chans": 3, "dim": 32, "depth": 2, "num_heads": 2,
         "mlp_ratio": 4.0, "proj_hidden": 48, "pred_width": 24, "pred_depth": 2, "pred_heads": 2, "head_hidden": 40,
         "heads_ahead": 1, "num_block_orders": 16}  # the micro recipe's XTRASizes
OLD = {
    # engine/checkpoint.py: json.dumps({"step", "world_size", "time", **trainer.checkpoint_meta()}, indent=1)
    "COMPLETE": (CheckpointRecord, {"step": 8, "world_size": 2, "time": 1.7e9, "layout": LAYOUT, "global_batch": 8,
                                    "zero_stage": 3, "precision": "bf16", "total_steps": 12, "data": DATA}),
    # the same, from before the checkpoint meta (step, world size and time only)
    "COMPLETE, oldest": (CheckpointRecord, {"step": 4, "world_size": 2, "time": 1.0}),
    # engine/checkpoint.py, a re-partitioned copy: world_4/COMPLETE
    "world_W/COMPLETE": (RepartitionRecord, {"from_world_size": 2, "world_size": 4, "source": "9f86d081884c7d65"}),
    # rundir.write_export: {**meta, "step": step, "time": time.time()}
    "meta.json": (ExportMeta, {"samples_seen": 96, "model": "xtra_vit_tiny_patch8", "sizes": SIZES,
                               "config": "../../config.yaml", "final": True, "step": 12, "time": 1.7e9}),
    # eval/worker.py, an export evaluated
    "ledger, done": (LedgerEntry, {"step": 4, "export": "exports/step_00000004", "dataset": "digits", "status": "done",
                                   "linear_top1": 0.9, "attentive_top1": 0.93, "seconds": 1.2, "tb": "eval",
                                   "final": False, "time": 1.7e9}),
    # eval/worker.py, an export that could not be evaluated (final: from meta.json or state.json when known)
    "ledger, failed": (LedgerEntry, {"step": 8, "export": "exports/step_00000008", "dataset": "digits",
                                     "status": "failed", "reason": "exports/step_00000008: no meta.json",
                                     "final": True, "time": 1.7e9}),
    "ledger, failed, final unknown": (LedgerEntry, {"step": 8, "export": "exports/step_00000008", "dataset": "digits",
                                                    "status": "failed", "reason": "storage failed 3 times: reset",
                                                    "time": 1.7e9}),
    # engine/trainer.py: state.json
    "state.json": (TrainingState, {"status": "done", "step": 12, "total_steps": 12, "reason": "", "time": 1.7e9}),
}


def fields_of(record) -> dict:
    """The record's known fields as its JSON spells them (a ledger entry's top-1s as ``<probe>_top1``)."""
    return {k: v for k, v in record.to_dict().items() if k not in record.extra and k != "version"}


@pytest.mark.parametrize("name", OLD)
def test_records_read_what_the_code_before_them_wrote(name, tmp_path):
    cls, old = OLD[name]
    (tmp_path / "record.json").write_text(json.dumps(old, indent=1))
    record = cls.read(tmp_path / "record.json")
    assert record is not None, f"{name}: not read"
    assert record.extra == {}, f"{name}: a field of the old format is not a field of {cls.__name__}"
    got = fields_of(record)
    assert {k: got[k] for k in old} == old  # every value as written
    defaults = fields_of(cls.from_dict({k: old[k] for k in ("step", "dataset", "status") if k in old}))
    assert {k: got[k] for k in got.keys() - old.keys()} == {k: defaults[k] for k in got.keys() - old.keys()}


def test_old_records_mean_what_they_meant(tmp_path):
    """The typed view of the old files: what resume, inspect_checkpoint, the eval worker and its --until-final
    read from them."""
    ckpt = CheckpointRecord.from_json(json.dumps(OLD["COMPLETE"][1]))
    assert (ckpt.step, ckpt.world_size, ckpt.layout["micro_batch"], ckpt.data["shards"][1]) == \
        (8, 2, 4, "train-000001.tar")
    oldest = CheckpointRecord.from_json(json.dumps(OLD["COMPLETE, oldest"][1]))
    assert (oldest.global_batch, oldest.zero_stage, oldest.layout, oldest.data) == (None, None, {}, {})
    done = LedgerEntry.from_json(json.dumps(OLD["ledger, done"][1]))
    assert done.top1 == {"linear": 0.9, "attentive": 0.93} and done.final is False and done.reason == ""
    failed = LedgerEntry.from_json(json.dumps(OLD["ledger, failed"][1]))
    assert failed.top1 == {} and failed.final is True and failed.status == LedgerEntry.FAILED
    assert LedgerEntry.from_json(json.dumps(OLD["ledger, failed, final unknown"][1])).final is None
    meta = ExportMeta.from_json(json.dumps(OLD["meta.json"][1]))
    assert meta.final is True and meta.sizes == SIZES and meta.samples_seen == 96

    # and through the run directory's own readers
    run = RunDir(tmp_path)
    run.write_text(STATE, json.dumps(OLD["state.json"][1], indent=1))
    state = run.training_state()
    assert state.status == TrainingState.DONE and state.ended and state.total_steps == 12
    for key in ("ledger, done", "ledger, failed"):
        old = OLD[key][1]
        run.write_text(ledger_record(old["dataset"], old["step"]), json.dumps(old, indent=1))
    outcomes = Ledger(run).outcomes("digits")
    assert {s: e.status for s, e in outcomes.items()} == {4: "done", 8: "failed"}
    assert outcomes[4].top1["attentive"] == 0.93


@pytest.mark.parametrize("name", OLD)
def test_round_trips_keep_every_field(name):
    """Read and written back (a resume's re-written marker, a retried ledger record): nothing of the file is lost,
    fields this code does not know included, and the typed view reads the same again."""
    cls, old = OLD[name]
    unknown = {"written_by": "a later version", "lineage": {"parent": "step_00000004", "hops": [1, 2]}}
    record = cls.from_json(json.dumps({**old, **unknown}))
    assert record.extra == unknown
    written = json.loads(record.to_json())
    assert {k: written[k] for k in (*old, *unknown)} == {**old, **unknown}
    assert written["version"] == cls.VERSION
    again = cls.from_json(record.to_json())
    assert again == record and again.extra == unknown and fields_of(again) == fields_of(record)


@pytest.mark.parametrize("name", OLD)
def test_a_record_newer_than_the_code_still_reads(name, tmp_path):
    """A record from a later format (a higher version, fields this code has never heard of) reads: the fields
    this code knows, as they are; the rest kept aside, not an error."""
    cls, old = OLD[name]
    newer = {**old, "version": cls.VERSION + 1, "checksum": "sha256:00ff", "probe_config": {"lrs": [1e-3]}}
    (tmp_path / "record.json").write_text(json.dumps(newer))
    record = cls.read(tmp_path / "record.json")
    assert record is not None, f"{name}: a newer record does not read"
    got = fields_of(record)
    assert {k: got[k] for k in old} == old
    assert record.extra == {"checksum": "sha256:00ff", "probe_config": {"lrs": [1e-3]}, "version": cls.VERSION + 1}
    assert record.to_dict()["version"] == cls.VERSION + 1  # written back as the newer format it is


def test_newer_records_reach_the_readers(tmp_path):
    """The same through the run directory: state.json and ledger records of a later format."""
    run = RunDir(tmp_path)
    run.write_text(STATE, json.dumps({**OLD["state.json"][1], "version": 9, "status": "running", "host": "n1"}))
    assert run.training_state().status == TrainingState.RUNNING and not run.training_state().ended
    old = OLD["ledger, done"][1]
    run.write_text(ledger_record("digits", 4), json.dumps({**old, "version": 9, "knn_top1": 0.8, "gpu": "h200"}))
    entry = Ledger(run).outcomes("digits")[4]
    assert entry.status == "done" and entry.top1 == {"linear": 0.9, "attentive": 0.93, "knn": 0.8}
    assert entry.extra == {"gpu": "h200", "version": 9}
