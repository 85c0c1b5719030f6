"""Leases: several eval workers of one dataset on one run directory (an ``s3://`` one, where no lock reaches)
evaluate each export exactly once — against the loopback S3 server (moto) and a local disk."""

from __future__ import annotations

import json
import threading
import time

import pytest

from xtra_ds.config.schema import EvalConfig
from xtra_ds.eval import lease as lease_module
from xtra_ds.eval.lease import LEASE_SECONDS, LeaseLost, Leases, create_exclusive
from xtra_ds.eval.ledger import Ledger
from xtra_ds.eval.worker import EvalWorker
from xtra_ds.rundir import RunDir, ledger_record

from helpers.corpus import labelled_shards
from helpers.exports import export_of, tiny_encoder


def later(seconds: float):
    """A clock ``seconds`` ahead: how the world looks once a holder has stopped renewing for that long."""
    return lambda: time.time() + seconds


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path):
    """An empty run directory, on a local disk or in a fresh bucket of the loopback S3 server."""
    if request.param == "local":
        return RunDir(tmp_path / "run")
    s3 = request.getfixturevalue("s3")
    return RunDir(f"s3://{s3['bucket']}/run", s3["options"])


def s3_run(tmp_path, s3, steps) -> RunDir:
    """An s3:// run directory holding an export of each of ``steps``, uploaded as a sync would."""
    run = RunDir(f"s3://{s3['bucket']}/run", s3["options"])
    for step in steps:
        export_of(tmp_path / "local", step, tiny_encoder(step))
        for f in ("meta.json", "encoder.safetensors"):
            run.fs.put_file(str(tmp_path / f"local/exports/step_{step:08d}/{f}"),
                            run.path(f"exports/step_{step:08d}/{f}"))
    return run


def eval_config(tmp_path, dataset="digits") -> EvalConfig:
    train, val = labelled_shards(tmp_path, "train", 24), labelled_shards(tmp_path, "val", 12)
    return EvalConfig(train=train, val=val, dataset=dataset, epochs=1, batch_size=8, lrs=[1e-2], probes=["linear"],
                      device="cpu", poll_seconds=0.01)


def counted(worker: EvalWorker, calls: list) -> EvalWorker:
    """``worker`` noting in ``calls`` each step it evaluates."""
    real = worker.evaluator.evaluate

    def evaluate(step, *args, **kwargs):
        calls.append(step)
        return real(step, *args, **kwargs)

    worker.evaluator.evaluate = evaluate
    return worker


def test_conditional_create_refuses_a_second_creation(run_dir):
    path = run_dir.path("eval/leases/x/step_00000010/gen_000001.json")
    assert create_exclusive(run_dir.fs, path, b'{"who": "first"}')
    assert not create_exclusive(run_dir.fs, path, b'{"who": "second"}')
    assert json.loads(run_dir.fs.cat_file(path)) == {"who": "first"}
    assert [p.rsplit("/", 1)[-1] for p in run_dir.fs.ls(run_dir.path("eval/leases/x/step_00000010"),
                                                        detail=False, refresh=True)] == ["gen_000001.json"]


def test_two_workers_on_one_s3_run_evaluate_each_export_once(tmp_path, s3):
    """Two workers of one dataset, at once, on one s3:// run: every export is evaluated by exactly one of them.
    Without leases each evaluated all four."""
    steps = [10, 20, 30, 40]
    run = s3_run(tmp_path, s3, steps)
    cfg, calls = eval_config(tmp_path), []
    workers = [counted(EvalWorker(RunDir(run.url, s3["options"]), cfg, storage_options=s3["options"],
                                  tb_dir=str(tmp_path / f"tb{i}")), calls) for i in range(2)]
    results = [None, None]

    def work(i):
        results[i] = workers[i].run_loop(once=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for w in workers:
        w.close()
    assert results == [0, 0]
    assert sorted(calls) == steps, f"evaluations per export: { {s: calls.count(s) for s in steps} }"
    assert sum(w.evaluated for w in workers) == len(steps)
    outcomes = Ledger(RunDir(run.url, s3["options"])).outcomes("digits")
    assert sorted(outcomes) == steps and {e.status for e in outcomes.values()} == {"done"}
    assert all(run.fs.exists(run.path(f"eval/results/digits/step_{s:08d}.json")) for s in steps)


def test_a_worker_reads_the_record_again_once_it_holds_the_lease(tmp_path, s3):
    """A worker that read the ledger before another recorded the exports evaluates none of them again."""
    run = s3_run(tmp_path, s3, [10, 20])
    cfg, calls = eval_config(tmp_path), []
    first, second = (counted(EvalWorker(RunDir(run.url, s3["options"]), cfg, storage_options=s3["options"],
                                        tb_dir=str(tmp_path / f"tb{i}")), calls) for i in range(2))
    assert first.run_loop(once=True) == 0 and calls == [10, 20]
    assert second.run_loop(once=True) == 0 and calls == [10, 20] and second.evaluated == 0
    assert sorted(second.ledger.outcomes("digits")) == [10, 20]  # what it found is remembered
    first.close(), second.close()


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two_contenders(run_dir, monkeypatch):
    """A worker that died holds its lease until it expires; then of two workers that both saw it expired and
    both try to take it over at once, exactly one succeeds, and the dead one's renewal finds it lost."""
    dead = Leases(run_dir, "digits").acquire(10)
    assert dead is not None and dead.generation == 1
    assert Leases(run_dir, "digits").acquire(10) is None  # not expired: held
    both_looked = threading.Barrier(2, timeout=60)
    real = lease_module.create_exclusive

    def after_both_looked(fs, path, data):  # both contenders have judged generation 1 expired before either creates
        both_looked.wait()
        return real(fs, path, data)

    monkeypatch.setattr(lease_module, "create_exclusive", after_both_looked)
    contenders = [Leases(run_dir, "digits", clock=later(2 * LEASE_SECONDS)) for _ in range(2)]
    got = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, contenders[i].acquire(10))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.setattr(lease_module, "create_exclusive", real)
    winners = [g for g in got if g is not None]
    assert len(winners) == 1 and winners[0].generation == 2
    with pytest.raises(LeaseLost, match="taken over by"):
        dead.renew()
    loser = contenders[got.index(None)]
    assert loser.acquire(10) is None  # the winner's lease is fresh
    winners[0].release()
    assert loser.acquire(10).generation == 4  # released: free at once


def test_a_kept_lease_is_renewed_and_notices_a_takeover(run_dir):
    """While an evaluation runs its lease is renewed in the background; a renewal that finds the lease taken
    over marks it lost, and the holder's next check stops it."""
    holder = Leases(run_dir, "digits", seconds=0.3)  # renewed every 0.1 s
    lease = holder.acquire(10)
    with lease.kept():
        deadline = time.monotonic() + 60
        while lease.generation < 3 and time.monotonic() < deadline:  # two renewals
            time.sleep(0.01)
        assert lease.generation >= 3
        thief = Leases(run_dir, "digits", clock=later(60))  # sees the holder's lease as long expired
        taken = None
        while taken is None and time.monotonic() < deadline:  # a renewal may win a round; the thief tries again
            taken = thief.acquire(10)
        assert taken is not None
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(LeaseLost, match="taken over by"):
            lease.check()


def test_a_worker_whose_lease_was_taken_over_writes_nothing(tmp_path, s3, caplog):
    """A worker that stalled past its lease while evaluating, and whose lease another worker took over, writes
    no results, no TensorBoard scalars and no ledger record: the export is the new holder's."""
    run = s3_run(tmp_path, s3, [10])
    w = EvalWorker(RunDir(run.url, s3["options"]), eval_config(tmp_path), storage_options=s3["options"],
                   tb_dir=str(tmp_path / "tb"))
    real, taken = w.evaluator.evaluate, []

    def stalled(step, *args, **kwargs):
        res = real(step, *args, **kwargs)
        taken.append(Leases(run, "digits", clock=later(2 * LEASE_SECONDS)).acquire(step))
        return res

    w.evaluator.evaluate = stalled
    caplog.set_level("INFO", logger="xtra_ds.eval")
    assert w.evaluator.process(10) is None
    w.close()
    assert taken and taken[0] is not None
    assert not run.fs.exists(run.path(ledger_record("digits", 10)))
    assert not run.fs.exists(run.path("eval/results/digits/step_00000010.json"))
    assert not (tmp_path / "tb").exists() and w.evaluated == 0
    assert "taken over by" in caplog.text and "nothing recorded" in caplog.text


def test_storage_without_conditional_create_runs_unguarded(caplog):
    """Where no create-if-absent exists (here fsspec's memory store) a worker still runs, alone, with a warning."""
    caplog.set_level("WARNING", logger="xtra_ds.eval")
    leases = Leases(RunDir("memory://run"), "digits")
    lease = leases.acquire(10)
    assert not leases.guarded and lease is not None
    with lease.kept():
        lease.renew()
    lease.release()
    assert "run one per dataset" in caplog.text


def test_a_lease_of_a_worker_gone_from_this_machine_is_free_at_once(run_dir):
    """A worker killed (kill -9) and started again on the same machine goes on at once with the export it was on;
    a lease from another process namespace (another container, another machine) waits for its expiry."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = Leases(run_dir, "digits")
    killed.owner = {**killed.owner, "pid": int(gone.stdout)}  # the pid of a process that has ended
    assert killed.acquire(10) is not None
    restarted = Leases(run_dir, "digits")
    assert restarted.acquire(10) is not None
    elsewhere = Leases(run_dir, "digits")
    elsewhere.owner = {**elsewhere.owner, "pid": int(gone.stdout), "pid_space": "another-machine/pid:[1]"}
    assert elsewhere.acquire(20) is not None
    assert restarted.acquire(20) is None
