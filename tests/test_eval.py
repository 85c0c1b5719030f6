"""Probes, encoder loading, the worker's bookkeeping (fall-behind policy, failures, when it ends) and a worker
over an S3 run directory — fast, without a training run. The run directory's own files (ledger records, export
listing, publishing) are tests/test_rundir.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from xtra_ds.config import ConfigError, load_config
from xtra_ds.config.schema import EvalConfig
from xtra_ds.eval.encoder import ExportError, load_encoder, load_export
from xtra_ds.eval.features import Features, LabelledSet, check_classes
from xtra_ds.eval.ledger import Ledger
from xtra_ds.eval.policy import choose, dataset_name
from xtra_ds.eval.probes import AttentiveProbe, LinearProbe, ProbeBank
from xtra_ds.eval.quick import fit_probe
from xtra_ds.eval.worker import EvalWorker
from xtra_ds.interop import export_encoder
from xtra_ds.rundir import ExportMeta, RunDir, write_export

from conftest import tiny_sizes
from helpers.corpus import labelled_shards
from helpers.exports import export_of, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
# the micro recipe's encoder, as size overrides of the named variant (what a weights file needs)
TINY = {k: getattr(tiny_sizes(), k) for k in ("img_size", "block_size", "dim", "depth", "num_heads")}


# --- probes ------------------------------------------------------------------------------------

def test_attentive_probe_equals_textbook_attention():
    p = AttentiveProbe(64, 7, num_heads=16)
    x = torch.randn(5, 12, 64) * 3 + 1
    for mode in (p.train, p.eval):
        mode()
        torch.testing.assert_close(p(x), p.reference(x), rtol=1e-5, atol=1e-5)


def test_probe_structure():
    a, lin = AttentiveProbe(64, 7, num_heads=16), LinearProbe(64, 7)
    assert a.k.bias is None and a.v.bias is None and a.query.shape == (1, 1, 64)
    assert not a.norm.affine and not lin.norm.affine
    with pytest.raises(ValueError, match="not divisible by 16 heads"):
        AttentiveProbe(40, 3)


def test_bank_heads_follow_their_own_learning_rate():
    bank = ProbeBank("linear", 8, 3, [0.0, 1e-2], total_steps=10, weight_decay=0.0)
    before = [h.linear.weight.detach().clone() for h in bank.heads]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        bank.train_step(x, y)
    assert torch.equal(bank.heads[0].linear.weight, before[0])  # lr 0: untouched
    assert not torch.allclose(bank.heads[1].linear.weight, before[1])


def test_bank_schedule_cosine_to_min_lr():
    bank = ProbeBank("linear", 4, 2, [1e-3], total_steps=100, min_lr=1e-5, warmup_steps=10)
    assert bank.lr_factor(0) == pytest.approx(0.1) and bank.lr_factor(10) == pytest.approx(1.0)
    assert bank.lr_factor(100) == pytest.approx(0.0, abs=1e-12)
    bank.step_count = 100
    bank.train_step(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    assert all(g["lr"] == pytest.approx(1e-5) for g in bank.opt.param_groups)


def test_bank_clips_each_head():
    bank = ProbeBank("linear", 8, 3, [1.0, 1.0], total_steps=1, weight_decay=0.0, clip=1e-3)
    x, y = torch.randn(32, 8) * 100, torch.randint(0, 3, (32,))
    bank.train_step(x, y)
    for h in bank.heads:
        n = torch.sqrt(sum((p.grad ** 2).sum() for p in h.parameters()))
        assert n <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["linear", "attentive"])
def test_quick_probe_learns_separable_classes(kind):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 2

    def features(n):
        y = torch.arange(n) % 4
        tokens = centres[y][:, None, :] + torch.randn(n, 6, 32, generator=g)  # [n, 6, 32]
        return Features(tokens.mean(1), tokens.half(), y)

    res = fit_probe(kind, features(400), features(200), num_classes=4, lrs=[1e-3, 1e-2], epochs=5, batch_size=32)
    assert res["top1"] > 0.95, res
    assert set(res["per_lr"]) == {"0.001", "0.01"} and res["lr"] in (1e-3, 1e-2)


# --- encoders ----------------------------------------------------------------------------------

def test_load_export_roundtrip_and_features_match(tmp_path):
    enc = tiny_encoder()
    folder = export_of(tmp_path, 7, enc)
    got, meta = load_export(str(folder))
    assert meta.step == 7 and not any(p.requires_grad for p in got.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(got(x), enc.eval()(x))


def test_load_encoder_from_weights_file_needs_model(tmp_path):
    enc = tiny_encoder()
    export_encoder(enc, tmp_path / "enc.safetensors")
    with pytest.raises(ExportError, match="pass --model"):
        load_encoder(str(tmp_path / "enc.safetensors"))
    got, _ = load_encoder(str(tmp_path / "enc.safetensors"), model="xtra_vit_tiny_patch8", **TINY)
    torch.testing.assert_close(got.pos_embed, enc.pos_embed)
    with pytest.raises(ExportError, match="shape mismatches"):
        load_encoder(str(tmp_path / "enc.safetensors"), model="xtra_vit_tiny_patch8", **{**TINY, "dim": 64})


def test_bad_exports_name_the_reason(tmp_path):
    folder = export_of(tmp_path, 1, tiny_encoder())
    f = folder / "encoder.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_export(str(folder))
    folder = export_of(tmp_path, 2, tiny_encoder())
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_export(str(folder))
    enc = tiny_encoder()
    with torch.no_grad():
        enc.pos_embed[0, 0, 0] = math.nan
    with pytest.raises(ExportError, match="non-finite"):
        load_export(str(export_of(tmp_path, 3, enc)))


# --- worker bookkeeping ------------------------------------------------------------------------

def test_policy_oldest_first_newest_when_behind():
    assert choose([50, 100], max_pending=2) == 50
    assert choose([50, 100, 150], max_pending=2) == 150
    assert choose([100], max_pending=0) == 100


def test_dataset_name():
    assert dataset_name("runs/demo/digits/val/manifest.json") == "digits"
    assert dataset_name("s3://bucket/in1k/val") == "in1k"
    assert dataset_name("s3://b/inat/val-{000000..000009}.tar") == "inat"


def test_eval_config_is_checked():
    with pytest.raises(ConfigError, match="eval.probes"):
        load_config(ROOT / "ds_configs/tiny_cpu.yaml", ["eval.probes=[linear, knn]"])
    with pytest.raises(ConfigError, match="eval.device"):
        load_config(ROOT / "ds_configs/tiny_cpu.yaml", ["eval.device=tpu"])
    with pytest.raises(ValueError, match="eval.train and eval.val"):
        EvalWorker(RunDir("runs/x"), EvalConfig(), tb_dir="runs/x/tb")


def test_worker_refuses_missing_eval_shards_at_start(tmp_path):
    (tmp_path / "nope").mkdir()  # a folder without a data_prep manifest
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        EvalWorker(RunDir(tmp_path), EvalConfig(train=str(tmp_path / "nope"), val=str(tmp_path / "nope"), device="cpu"),
                   tb_dir=str(tmp_path / "tb"))


def test_splits_must_number_classes_alike():
    a = LabelledSet("t", torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), {"cat": 0,
                                                                                                        "dog": 1})
    b = LabelledSet("v", a.images, a.labels, {"cat": 1, "dog": 0})
    with pytest.raises(ValueError, match="number their classes differently"):
        check_classes(a.spec, a.classes, b.spec, b.classes)


# --- a worker over S3 --------------------------------------------------------------------------

def test_worker_on_an_s3_run_directory(tmp_path, s3):
    import fsspec

    from xtra_ds.storage import storage_options_for
    fs = fsspec.filesystem("s3", **storage_options_for("s3://", s3["options"]))
    b = s3["bucket"]
    train, val = labelled_shards(tmp_path, "train", 40), labelled_shards(tmp_path, "val", 20)
    local = tmp_path / "run"
    for step in (10, 20):
        export_of(local, step, tiny_encoder(step))
        for f in ("meta.json", "encoder.safetensors"):
            fs.put_file(str(local / f"exports/step_{step:08d}/{f}"), f"{b}/run/exports/step_{step:08d}/{f}")
    fs.pipe(f"{b}/run/exports/step_00000030/meta.json", b"{}")  # still uploading: no encoder yet
    cfg = EvalConfig(train=train, val=val, epochs=2, batch_size=8, lrs=[1e-2], device="cpu", max_pending=5)
    w = EvalWorker(RunDir(f"s3://{b}/run", s3["options"]), cfg, storage_options=s3["options"],
                   tb_dir=str(tmp_path / "tb"))
    assert w.run_loop(once=True) == 0
    w.close()
    ledger = sorted(Ledger(RunDir(f"s3://{b}/run", s3["options"])).entries, key=lambda e: e.step)
    assert [(e.step, e.status) for e in ledger] == [(10, "done"), (20, "done")]
    assert ledger[0].top1["attentive"] > 0.9  # two classes a child could tell apart
    assert fs.exists(f"{b}/run/eval/results/shards_val/step_00000010.json")
    assert list((tmp_path / "tb" / "eval").glob("events.out.tfevents.*"))


def test_load_encoder_from_an_official_style_checkpoint(tmp_path):
    from xtra_ds.models.xtra import XTRA

    model = XTRA(tiny_sizes())
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "xtra.ckpt")  # a Lightning checkpoint, as the official ones are
    enc, meta = load_encoder(str(tmp_path / "xtra.ckpt"), model="xtra_vit_tiny_patch8", **TINY)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), model.enc.eval()(x))
    assert meta.model == "xtra_vit_tiny_patch8"


def test_max_samples_keeps_every_class(tmp_path):
    from xtra_ds.eval.features import load_labelled

    spec = labelled_shards(tmp_path, "train", 40)  # data_prep writes class 0's images, then class 1's
    data = load_labelled(spec, 32, max_samples=10)
    assert len(data) == 10 and set(data.labels.tolist()) == {0, 1}
    assert data.classes == {"0": 0, "1": 1}


def test_two_workers_on_one_s3_run_directory_keep_both_ledgers(tmp_path, s3):
    """Two datasets, two workers at once on one s3:// run: no lock reaches there, and neither may lose the
    other's outcomes (a ledger rewritten whole from each worker's memory did)."""
    import threading

    import fsspec

    from xtra_ds.storage import storage_options_for
    fs = fsspec.filesystem("s3", **storage_options_for("s3://", s3["options"]))
    b = s3["bucket"]
    train, val = labelled_shards(tmp_path, "train", 24), labelled_shards(tmp_path, "val", 12)
    for step in (10, 20):
        export_of(tmp_path / "run", step, tiny_encoder(step))
        for f in ("meta.json", "encoder.safetensors"):
            fs.put_file(str(tmp_path / f"run/exports/step_{step:08d}/{f}"), f"{b}/run/exports/step_{step:08d}/{f}")
    workers = [EvalWorker(RunDir(f"s3://{b}/run", s3["options"]),
                          EvalConfig(train=train, val=val, dataset=name, epochs=1, batch_size=8, lrs=[1e-2],
                                     probes=["linear"], device="cpu"),
                          storage_options=s3["options"], tb_dir=str(tmp_path / f"tb_{name}")) for name in ("a", "b")]
    threads = [threading.Thread(target=w.run_loop, kwargs={"once": True}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    ledger = Ledger(RunDir(f"s3://{b}/run", s3["options"]))
    assert {d: sorted(ledger.outcomes(d)) for d in ("a", "b")} == {"a": [10, 20], "b": [10, 20]}


def _two_exports_and_data(tmp_path):
    train, val = labelled_shards(tmp_path, "train", 24), labelled_shards(tmp_path, "val", 12)
    for step in (10, 20):
        export_of(tmp_path / "run", step, tiny_encoder(step))
    return EvalConfig(train=train, val=val, epochs=1, batch_size=8, lrs=[1e-2], probes=["linear"], device="cpu",
                      poll_seconds=0.01, storage_retries=3)


def test_a_storage_error_on_one_export_is_bounded(tmp_path, monkeypatch):
    """An export that storage never serves is tried eval.storage_retries times, recorded as failed with the
    reason, and the worker goes on with the next one (it once retried that export for ever)."""
    cfg = _two_exports_and_data(tmp_path)
    w = EvalWorker(RunDir(tmp_path / "run"), cfg, tb_dir=str(tmp_path / "tb"))
    real, tries = w.run.fs.cat_file, []

    def flaky(path, *a, **kw):
        if "step_00000010" in str(path) and str(path).endswith("encoder.safetensors"):
            tries.append(path)
            raise ConnectionResetError("connection reset by peer")
        return real(path, *a, **kw)

    monkeypatch.setattr(w.run.fs, "cat_file", flaky)  # fsspec shares the instance: undone after the test
    assert w.run_loop(once=True) == 0
    w.close()
    out = w.ledger.outcomes(w.dataset)
    assert out[10].status == "failed" and "storage failed 3 times" in out[10].reason
    assert "ConnectionResetError" in out[10].reason and len(tries) == 3
    assert out[20].status == "done"


def test_a_lost_eval_shard_stops_the_worker_with_the_reason(tmp_path):
    cfg = _two_exports_and_data(tmp_path)
    (Path(cfg.val).parent / "val-000000.tar").unlink()  # lost after the worker was configured
    from xtra_ds.eval.features import EvalDataError

    w = EvalWorker(RunDir(tmp_path / "run"), cfg, tb_dir=str(tmp_path / "tb"))
    with pytest.raises(EvalDataError, match="cannot read shard .*val-000000.tar"):
        w.run_loop(once=True)
    w.close()
    import subprocess
    import sys
    (tmp_path / "run/config.yaml").write_text((ROOT / "ds_configs/test_micro.yaml").read_text())
    r = subprocess.run([sys.executable, str(ROOT / "launchers/eval_worker.py"), "--run-dir", str(tmp_path / "run"),
                        "--once", f"eval.train={cfg.train}", f"eval.val={cfg.val}", "eval.device=cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot read shard" in r.stderr and "val-000000.tar" in r.stderr, r.stderr[-2000:]


def test_the_worker_reads_a_vanished_export_once_more(tmp_path, monkeypatch):
    from xtra_ds.eval import worker as worker_module

    cfg = _two_exports_and_data(tmp_path)
    w = EvalWorker(RunDir(tmp_path / "run"), cfg, tb_dir=str(tmp_path / "tb"))
    real, calls = worker_module.load_export, []

    def vanishing_once(folder, *a, **kw):
        calls.append(folder)
        if len(calls) == 1:
            raise ExportError(f"{folder}: no meta.json", vanished=True)
        return real(folder, *a, **kw)

    monkeypatch.setattr(worker_module, "load_export", vanishing_once)
    assert w.evaluator.process(10).status == "done" and len(calls) == 2
    w.close()


# --- --until-final: when the worker ends -------------------------------------------------------

class _Loop:
    """``run_loop`` (by default ``until_final=True``) in a thread, counting the worker's looks at the run
    directory."""

    def __init__(self, worker: EvalWorker, **loop_kwargs):
        import threading

        self.worker, self.looks, self.rc = worker, 0, None
        self.loop_kwargs = loop_kwargs or {"until_final": True}
        real = worker.pending

        def counted():
            self.looks += 1
            return real()

        worker.pending = counted
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.rc = self.worker.run_loop(**self.loop_kwargs)

    def ended(self, timeout: float = 120) -> bool:
        """Whether the loop returned (the timeout only guards against a hang; a drain then stops the thread)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.worker.request_drain()
            self.thread.join(60)
            return False
        return True

    def waits_after(self, looks: int, timeout: float = 120) -> bool:
        """Whether the loop is still waiting after ``looks`` more looks at the run directory."""
        import time

        target, t0 = self.looks + looks, time.monotonic()
        while self.looks < target and self.thread.is_alive() and time.monotonic() - t0 < timeout:
            time.sleep(0.01)
        return self.looks >= target and self.thread.is_alive()


def _training_state(run: Path, status: str, step: int, total_steps: int, reason: str = "") -> None:
    """state.json as the trainer writes it."""
    import time

    from xtra_ds.rundir import STATE
    RunDir(run).write_text(STATE, json.dumps({"status": status, "step": step, "total_steps": total_steps,
                                              "reason": reason, "time": time.time()}))


@pytest.mark.parametrize("damage", ["meta.json", "encoder.safetensors"])
def test_until_final_ends_when_the_final_export_is_corrupt(tmp_path, caplog, damage):
    """A final export that cannot be evaluated is still the final one: the worker records it as failed (with
    ``final``, from meta.json, or from the step against state.json's total_steps when meta.json is unreadable)
    and ends. It once waited for ever: failed records carried no ``final``."""
    cfg = _two_exports_and_data(tmp_path)
    run = tmp_path / "run"
    final = write_export(run, 30, tiny_encoder(30).state_dict(),
                         ExportMeta(model="xtra_vit_tiny_patch8", sizes=tiny_sizes().__dict__, final=True))
    if damage == "meta.json":
        (final / "meta.json").write_text("{not json")
        _training_state(run, "running", 30, 30)  # the trainer has not said done yet
    else:
        f = final / "encoder.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    w = EvalWorker(RunDir(run), cfg, tb_dir=str(tmp_path / "tb"))
    caplog.set_level("INFO", logger="xtra_ds.eval")
    loop = _Loop(w)
    assert loop.ended(), "the worker is still waiting after the final export failed"
    w.close()
    out = w.ledger.outcomes(w.dataset)
    assert loop.rc == 0 and {s: e.status for s, e in out.items()} == {10: "done", 20: "done", 30: "failed"}
    assert out[30].final is True and out[10].final is False
    assert "final export step_00000030 has an outcome (failed)" in caplog.text


@pytest.mark.parametrize("status", ["failed", "done"])
def test_until_final_ends_when_training_ended_without_a_final_export(tmp_path, caplog, status):
    """Training that stopped for good without exporting its last step (non-finite steps; or done by its config
    with nothing final exported): the worker evaluates what is there, then ends with the reason."""
    cfg = _two_exports_and_data(tmp_path)
    run = tmp_path / "run"
    _training_state(run, status, 25, 30, "non-finite loss at steps 23..25" if status == "failed" else "")
    w = EvalWorker(RunDir(run), cfg, tb_dir=str(tmp_path / "tb"))
    caplog.set_level("INFO", logger="xtra_ds.eval")
    loop = _Loop(w)
    assert loop.ended(), f"the worker is still waiting after training {status} without a final export"
    w.close()
    assert loop.rc == 0
    assert {s: e.status for s, e in w.ledger.outcomes(w.dataset).items()} == {10: "done", 20: "done"}
    assert f"training {status} at step 25" in caplog.text and "no complete export is left" in caplog.text


def test_until_final_waits_while_training_runs(tmp_path, caplog):
    """Running or stopped (to be resumed) without a final export: the worker keeps waiting; the final export
    then ends it, with a line that says so."""
    cfg = _two_exports_and_data(tmp_path)
    run = tmp_path / "run"
    _training_state(run, "running", 20, 30)
    w = EvalWorker(RunDir(run), cfg, tb_dir=str(tmp_path / "tb"))
    caplog.set_level("INFO", logger="xtra_ds.eval")
    loop = _Loop(w)
    assert loop.waits_after(5)
    assert {s: e.status for s, e in w.ledger.outcomes(w.dataset).items()} == {10: "done", 20: "done"}
    _training_state(run, "stopped", 20, 30, "SIGUSR1")
    assert loop.waits_after(5)
    _training_state(run, "running", 20, 30)
    write_export(run, 30, tiny_encoder(30).state_dict(),
                         ExportMeta(model="xtra_vit_tiny_patch8", sizes=tiny_sizes().__dict__, final=True))
    assert loop.ended(), "the worker is still waiting after the final export"
    w.close()
    assert loop.rc == 0 and w.ledger.outcomes(w.dataset)[30].status == "done"
    assert "final export step_00000030 has an outcome (done)" in caplog.text


def test_retry_failed_tries_each_failed_export_once(tmp_path):
    """--retry-failed tries the failed outcomes found at the start again, once each: an export that fails again
    keeps its new failed record and the worker ends (it once tried it again for ever, --once included)."""
    cfg = _two_exports_and_data(tmp_path)
    f = tmp_path / "run/exports/step_00000010/encoder.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    w = EvalWorker(RunDir(tmp_path / "run"), cfg, tb_dir=str(tmp_path / "tb"))
    assert w.run_loop(once=True) == 0
    w.close()
    first = w.ledger.outcomes(w.dataset)[10]
    again = EvalWorker(RunDir(tmp_path / "run"), cfg, tb_dir=str(tmp_path / "tb"), retry_failed=True)
    real, calls = again.evaluator.evaluate, []
    again.evaluator.evaluate = lambda step, *a, **kw: calls.append(step) or real(step, *a, **kw)
    loop = _Loop(again, once=True)
    assert loop.ended(), f"still retrying after {len(calls)} evaluations of step 10"
    again.close()
    assert loop.rc == 0 and calls == [10]
    out = Ledger(RunDir(tmp_path / "run")).outcomes(again.dataset)
    assert out[10].status == "failed" and out[10].time > first.time and out[20].status == "done"
