"""The cluster entry points, run for real on this one machine with real daemons on loopback addresses:

- ``deepspeed --hostfile hosts launchers/pretrain.py …`` through DeepSpeed's default runner (pdsh over
  ssh) to two "nodes", 127.0.0.2 and 127.0.0.3 (scripts/local_sshd.sh): trains, checkpoints, is stopped,
  resumes — with the losses of a one-node run of the same recipe;
- Slurm (scripts/local_slurm.sh: munge, slurmctld, slurmd): data prep as a job array plus a dependent
  finalize job, byte-identical to a single job; ``launchers/slurm_pretrain.sbatch`` preempted with
  ``scancel --signal=USR1 --batch``, requeueing itself and finishing with the losses of an
  uninterrupted run; the eval worker as its own job beside it, ending with ``--until-final``.

They need root and Debian's packages (the scripts install them when absent). Where either is
missing they skip with the reason — except in CI (CI=true), where a skip would hide a broken entry
point and is a failure instead.

On one machine every "node" is the same host, so DeepSpeed's pdsh runner, when stopped, kills every
``<this python> -u -m deepspeed.launcher.launch`` process here: do not run other DeepSpeed jobs of this
interpreter beside these tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from xtra_ds.engine.dist import free_port

from test_engine import losses

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = "ds_configs/tiny_cpu.yaml"  # the demo's recipe, as the README's commands use it
# the first checkpoint at step 2 leaves 10 steps for a stop signal to arrive before the run would end
RUN = ["schedule.total_steps=12", "schedule.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.export_every=6",
       "logging.log_every=1", "logging.recon_every=0"]


def unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} — in CI (CI=true) this test must run, not skip")
    pytest.skip(reason)


def daemons(script: str, base: Path, *args: str):
    """``scripts/<script> up`` (installing its Debian packages when absent); the matching ``down`` at exit.
    ``base`` must not exist yet: the script makes it (and refuses a folder already there)."""
    if os.geteuid() != 0:
        unavailable(f"{script} starts system daemons and installs Debian packages: it needs root")
    up = subprocess.run(["bash", str(ROOT / "scripts" / script), "up", str(base), *args], capture_output=True,
                        text=True, timeout=900)
    if up.returncode == 3:  # the packages are missing and could not be installed, or no loopback-only way
        subprocess.run(["bash", str(ROOT / "scripts" / script), "down", str(base)], capture_output=True)
        unavailable(up.stderr.strip())
    if up.returncode != 0:
        subprocess.run(["bash", str(ROOT / "scripts" / script), "down", str(base)], capture_output=True)
        pytest.fail(f"{script} up failed:\n{up.stdout}\n{up.stderr}")
    return lambda: subprocess.run(["bash", str(ROOT / "scripts" / script), "down", str(base)], capture_output=True,
                                  timeout=120)


def same_losses(got: dict[int, float], want: dict[int, float]):
    assert sorted(got) == sorted(want) == list(range(1, 13)), (sorted(got), sorted(want))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (step, got[step], loss)


def wait_until(cond, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if text in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo's digits, 64 px, sharded: train (pre-training and probe training) and val."""
    d = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--digits", "--out", str(d / "img"),
                    "--size", "64", "--shards", str(d / "shards")], check=True, capture_output=True, cwd=ROOT)
    return str(d / "shards/train/manifest.json"), str(d / "shards/val/manifest.json")


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The losses of an uninterrupted 2-rank run on one node (``deepspeed --num_gpus 2``)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    out = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                          "launchers/pretrain.py", "--config", RECIPE, f"data.train={digits[0]}", f"run_dir={run}",
                          *RUN], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return losses(run)


# --- deepspeed --hostfile: pdsh over ssh ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("sshd") / "dir"
    down = daemons("local_sshd.sh", base, str(free_port()))
    yield base
    down()


def test_hostfile_launch_over_ssh_trains_stops_and_resumes(ssh_nodes, digits, reference, tmp_path):
    """The README's multi-node command, through pdsh and ssh, to two loopback hosts: it trains and
    checkpoints, stops cleanly when the runner is interrupted (as Ctrl-C or a scheduler does), and the same
    command resumes it; every step's loss equals the one-node run's."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    run = tmp_path / "run"
    # `ssh` first in PATH is this machine's stand-in for the user's ~/.ssh/config (port, key); the master
    # address is given because `hostname -I`, DeepSpeed's default, names a non-loopback address here.
    env = {**os.environ, "PATH": f"{ssh_nodes}/bin:{os.environ['PATH']}"}
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hosts), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "launchers/pretrain.py", "--config", RECIPE, f"data.train={digits[0]}", f"run_dir={run}",
           *RUN]
    log1 = tmp_path / "first.log"
    with open(log1, "w") as out:
        runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (run / "checkpoints/step_00000002/COMPLETE").is_file() or runner.poll() is not None,
                       600, "the first checkpoint", log1)
            assert runner.poll() is None, log1.read_text()[-4000:]
            runner.send_signal(signal.SIGTERM)  # the runner stops pdsh and SIGTERMs each node's launcher
            runner.wait(timeout=120)
        finally:
            if runner.poll() is None:
                runner.kill()
    # the ranks, on their "nodes", save and exit on their own after the runner has gone
    wait_until(lambda: not processes_mentioning(f"run_dir={run}"), 120, "the remote ranks to exit", log1)
    first = log1.read_text()
    assert "127.0.0.2: " in first and "127.0.0.3: " in first, first[-4000:]  # pdsh's per-host prefixes
    # what rank 0 said after the runner (and with it the console) had gone is in its log file
    said = (run / "logs/rank0.log").read_text()
    stop = re.search(r"stopping at step (\d+) on SIGTERM: checkpoint saved", said)
    assert stop, said[-4000:]
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < 12 and max(losses(run)) == stopped_at, (stopped_at, sorted(losses(run)))
    assert (run / f"checkpoints/step_{stopped_at:08d}/COMPLETE").is_file()

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout, second.stdout[-4000:]
    same_losses(losses(run), reference)


# --- Slurm --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm") / "dir"
    down = daemons("local_slurm.sh", base)
    yield {**os.environ, "SLURM_CONF": str(base / "slurm.conf"), "PYTHON": sys.executable}
    down()


def sbatch(env, *args) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().split(";")[0]


def job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_slurm_prep_array_then_dependent_finalize_equals_one_job(slurm, tmp_path):
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--out", str(tmp_path / "corpus"),
                    "--n", "90", "--size", "48"], check=True, capture_output=True, cwd=ROOT)
    common = [str(tmp_path / "corpus"), "--shard-samples", "10"]
    one = subprocess.run([sys.executable, "-m", "data_prep.shard", *common, "--output", str(tmp_path / "one"),
                          "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr

    out = tmp_path / "array"
    array = sbatch(slurm, "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/prep-%A_%a.out",
                   "launchers/slurm_prep.sbatch", *common, "--output", str(out))
    final = subprocess.run(["sbatch", "--wait", f"--dependency=afterok:{array}", "--cpus-per-task=1",
                            f"--output={tmp_path}/finalize.out", "launchers/slurm_prep.sbatch", "finalize",
                            "--output", str(out)], cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert final.returncode == 0, final.stdout + final.stderr + logs
    for task in range(3):  # three jobs really shared the work
        assert job(slurm, f"{array}_{task}")["JobState"] == "COMPLETED"
    # The shards and their stats are byte-identical; the manifest differs only by its creation time (as
    # two single-job runs would) and the plan only by the number of jobs it records.
    got, want = files(out), files(tmp_path / "one")
    assert got.keys() == want.keys()
    assert sum(name.endswith(".tar") for name in got) == 9
    for name in got:
        if name in ("manifest.json", "_plan.json"):
            a, b = json.loads(got[name]), json.loads(want[name])
            for m in (a, b):
                m.pop("created", None), m.get("tool", {}).pop("created", None), m.pop("num_jobs", None)
            assert a == b, name
        else:
            assert got[name] == want[name], name


def test_slurm_pretrain_requeues_after_preemption_with_eval_job_beside(slurm, digits, reference, tmp_path):
    """sbatch launchers/slurm_pretrain.sbatch (1 node, 2 CPU ranks) and, beside it, the eval worker as its own
    job. USR1 to the batch script (as Slurm sends it before a time limit or preemption) → the script's
    forwarding step signals both ranks (by their pid files) and ends normally → the ranks save a checkpoint
    and exit → the script requeues its job → the job runs again, resumes, and completes with the losses of
    an uninterrupted run; the eval worker exits after the final export, every export probed."""
    run = tmp_path / "run"
    env = {**slurm, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    cpu_job = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the script's defaults ask for 8 GPUs and 96 CPUs
    train = sbatch(env, *cpu_job, f"--output={tmp_path}/train-%j.out", "launchers/slurm_pretrain.sbatch", RECIPE,
                   f"data.train={digits[0]}", f"run_dir={run}", *RUN)
    evaluation = sbatch(env, *cpu_job, f"--output={tmp_path}/eval-%j.out", "launchers/slurm_eval.sbatch",
                        "--run-dir", str(run), "--until-final", f"eval.train={digits[0]}", f"eval.val={digits[1]}",
                        "eval.poll_seconds=1", "eval.max_samples=600")
    try:
        assert job(env, evaluation)["TimeLimit"] == "2-00:00:00"  # the eval script's own --time (48 h)
        preempt_and_finish(env, run, train, evaluation, tmp_path, reference)
    finally:  # whatever failed, no job outlives the test
        subprocess.run(["scancel", "--full", train, evaluation], env=env, capture_output=True)


def preempt_and_finish(env, run: Path, train: str, evaluation: str, tmp_path: Path, reference: dict):
    train_log = tmp_path / f"train-{train}.out"
    eval_log = tmp_path / f"eval-{evaluation}.out"
    wait_until(lambda: (run / "checkpoints/step_00000002/COMPLETE").is_file()
               or job(env, train).get("JobState") not in ("PENDING", "RUNNING"), 600, "the first checkpoint",
               train_log)
    assert job(env, train)["JobState"] == "RUNNING", train_log.read_text()
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", train], env=env, capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr

    def finished(job_id):
        state = job(env, job_id).get("JobState")
        return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
            else None

    assert wait_until(lambda: finished(train), 900, "the training job", train_log) == "COMPLETED", \
        train_log.read_text()
    text = train_log.read_text()
    assert job(env, train)["Restarts"] == "1", text
    assert "requeueing job" in text and "(restart 1)" in text, text
    assert "on SIGUSR1: checkpoint saved" in text and "resumed from" in text, text
    # the forwarder reached both ranks of the one node and ended normally (a step whose task dies of a
    # signal makes srun say so, and the script reports a failed forwarding step)
    assert re.findall(r"preemption notice: \S+ signalled (\d+) rank", text) == ["2"], text
    assert "forwarding step failed" not in text and "User defined signal" not in text, text
    same_losses(losses(run), reference)

    assert wait_until(lambda: finished(evaluation), 600, "the eval job", eval_log) == "COMPLETED", \
        eval_log.read_text()
    from xtra_ds.eval.ledger import Ledger
    from xtra_ds.rundir import RunDir

    entries = Ledger(RunDir(run)).entries
    assert sorted({e.step for e in entries}) == [6, 12], entries
    assert all(e.status == e.DONE for e in entries), entries


def test_slurm_pretrain_requeues_a_hang_at_most_hang_requeues_times(slurm, digits, tmp_path):
    """Rank 1 stops dead at step 5, on every start: the hang watchdog ends the job with exit 75 and its stacks in
    incidents/; the script requeues the job once (HANG_REQUEUES=1); the requeued job resumes from the step-4
    checkpoint, hangs at step 5 again, and this time the job fails with 75 instead of looping forever."""
    run = tmp_path / "run"
    env = {**slurm, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "HANG_REQUEUES": "1",
           "XTRA_FAULT": "RANK=1:step_start@5=STOP"}
    train = sbatch(env, "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/train-%j.out",
                   "launchers/slurm_pretrain.sbatch", RECIPE, f"data.train={digits[0]}", f"run_dir={run}", *RUN,
                   "incidents.hang_timeout_s=5", "incidents.hang_floor_s=30")  # the first step after a start: 30 s
    log = tmp_path / f"train-{train}.out"
    try:
        state = wait_until(lambda: job(env, train).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                           and job(env, train)["JobState"], 900, "the training job", log)
        text = log.read_text()
        assert state == "FAILED" and job(env, train)["ExitCode"] == "75:0", (state, text)
        assert job(env, train)["Restarts"] == "1", text
        assert "hang (exit 75; stacks in" in text and "requeueing job" in text and "(restart 1)" in text, text
        assert "resumed from" in text and "after 1 restarts (HANG_REQUEUES=1): not requeueing" in text, text
        assert "ranks [1] did not" in text, text
        assert (run / "incidents/hang_00000005/rank0.txt").is_file()
    finally:
        subprocess.run(["scancel", "--full", train], env=env, capture_output=True)
