"""Every tool against a real S3 endpoint on loopback, named only by the environment, and secrets
that never reach a run directory or the logs. One training run (a single rank, no launcher) serves
data_prep, training, the eval worker and the probe tool in turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.corpus import plain_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY, SECRET = "SENTINELKEY7f3a9c", "SENTINELSECRETb41d2e"
TOKEN, FROM_FILE = "SENTINELTOKEN5e2c81", "SENTINELFILE9d4a07"


def run(args, env, timeout=600):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def test_every_tool_finds_s3_from_the_environment_and_no_secret_is_written(tmp_path, s3, monkeypatch):
    from xtra_ds.engine.dist import free_port

    bucket = s3["bucket"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    # the variable data_prep has always read; before, training and the eval worker ignored it
    env_only = {**base, "S3_ENDPOINT_URL": s3["endpoint"], "AWS_DEFAULT_REGION": "us-east-1"}
    creds = {**env_only, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    plain_corpus(tmp_path / "in", 48, size=(48, 48), classes=2)
    shards = f"s3://{bucket}/train"
    rc, out = run(["-m", "data_prep.shard", tmp_path / "in", "--output", shards, "--workers", "1", "--min-side", "16"],
                  creds)
    assert rc == 0, out

    # training: credentials on the command line are refused without being repeated (DeepSpeed's runner would
    # print them, and `ps` shows them)
    run_dir = tmp_path / "run"
    rank_env = {**env_only, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    train = [f"data.train={shards}/manifest.json", f"run_dir={run_dir}", "schedule.total_steps=4",
             "checkpoint.export_every=4", "data.num_workers=0", "deepspeed.precision=fp32"]
    rc, out = run([ROOT / "launchers/pretrain.py", "--config", ROOT / "ds_configs/test_micro.yaml", *train,
                   f"data.storage_options={{key: {KEY}, secret: {SECRET}}}"], rank_env)
    assert rc == 2, out
    assert "data.storage_options.key, data.storage_options.secret given on the command line" in out
    assert KEY not in out and SECRET not in out and not run_dir.exists()
    # credentials in a recipe file and in an env_file that the rank reads itself: used, never written or printed
    import yaml

    recipe = yaml.safe_load((ROOT / "ds_configs/test_micro.yaml").read_text())
    recipe["data"]["storage_options"] = {"key": KEY, "secret": SECRET, "client_kwargs": {"aws_session_token": TOKEN}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "s3.env").write_text(f"XTRA_TEST_API_TOKEN={FROM_FILE}\n")
    (tmp_path / "s3.env").chmod(0o600)
    rc, out = run([ROOT / "launchers/pretrain.py", "--config", tmp_path / "recipe.yaml", *train,
                   f"env_file={tmp_path / 's3.env'}"], {**rank_env, "MASTER_PORT": str(free_port())})
    assert rc == 0, out
    assert "step 4/4" in out and "set XTRA_TEST_API_TOKEN" in out
    for secret in (KEY, SECRET, TOKEN, FROM_FILE):
        assert secret not in out
        for f in run_dir.rglob("*"):
            assert not f.is_file() or secret.encode() not in f.read_bytes(), f"{secret} in {f}"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["storage_options"] == {"key": "<masked>", "secret": "<masked>",
                                                 "client_kwargs": {"aws_session_token": "<masked>"}}

    # the eval worker on an s3:// copy of the run: the run's masked options are dropped, the environment's
    # credentials and endpoint used
    import fsspec

    from xtra_ds.storage import storage_options_for
    fs = fsspec.filesystem("s3", **storage_options_for("s3://", s3["options"]))
    for f in ("config.yaml", "exports/step_00000004/meta.json", "exports/step_00000004/encoder.safetensors"):
        fs.put_file(str(run_dir / f), f"{bucket}/run/{f}")
    # (its credentials from an env_file: read before the s3:// run directory is, never printed)
    (tmp_path / "eval.env").write_text("AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n")
    (tmp_path / "eval.env").chmod(0o600)
    rc, out = run([ROOT / "launchers/eval_worker.py", "--run-dir", f"s3://{bucket}/run", "--once",
                   f"eval.train={shards}/manifest.json", f"eval.val={shards}/manifest.json", "eval.epochs=1",
                   "eval.lrs=[0.01]", "eval.batch_size=8", "eval.device=cpu", "eval.dataset=shards",
                   f"logging.tb_dir={tmp_path / 'tb'}", f"env_file={tmp_path / 'eval.env'}"],
                  env_only)
    assert rc == 0, out
    ledger = json.loads(fs.cat_file(f"{bucket}/run/eval/ledger/shards/step_00000004.json"))
    assert (ledger["step"], ledger["status"], ledger["dataset"]) == (4, "done", "shards")

    # the offline protocol on the s3:// export
    rc, out = run([ROOT / "launchers/probe.py", f"s3://{bucket}/run/exports/step_00000004",
                   "--train", f"{shards}/manifest.json", "--val", f"{shards}/manifest.json", "--epochs", "1",
                   "--batch-size", "8", "--workers", "0", "--lrs", "0.001", "--device", "cpu"], creds)
    assert rc == 0, out
    assert "(* best learning rate per probe)" in out
