"""A suite of datasets probed on every export and its mean: the suite file, the worker, several workers sharing a
suite on one s3:// run directory, and a dataset that failed (no mean, and why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xtra_ds.config import ConfigError, load_config
from xtra_ds.config.schema import EvalConfig
from xtra_ds.eval.suite import suite_of, suite_results
from xtra_ds.eval.worker import EvalWorker
from xtra_ds.rundir import RunDir

from helpers.corpus import labelled_shards
from helpers.exports import export_of, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(epochs=1, batch_size=8, lrs=[1e-2], probes=["linear"], device="cpu", poll_seconds=0.01)


def test_the_paper_suite_file_names_the_15_benchmarks_and_their_sweeps():
    suite = suite_of(load_config(None, ["eval.suite=ds_configs/eval/paper15.yaml",
                                        "eval.suite_root=s3://b/bench"]).eval)
    assert suite.name == "paper15" and len(suite.datasets) == 15
    assert [d.title for d in suite.datasets][:3] == ["ImageNet-1k", "iNaturalist-2018", "CIFAR-10"]
    in1k, cifar10, cars = (next(d for d in suite.datasets if d.name == n) for n in ("in1k", "cifar10", "cars"))
    assert in1k.train == "s3://b/bench/in1k/train/manifest.json" and in1k.classes == 1000
    assert in1k.protocol["lrs"] == [1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3]  # the official in1k sweep
    assert in1k.protocol["warmup_epochs"] == 10 and cifar10.protocol["warmup_epochs"] == 0
    assert len(cars.protocol["lrs"]) == 10 and cars.protocol["batch_size"] == 128
    assert {d.protocol["weight_decay"] for d in suite.datasets} == {0.1}
    assert cifar10.quick.dataset == "cifar10" and cifar10.quick.max_samples == 20000
    assert cifar10.quick.probes == ["attentive", "linear"]


@pytest.mark.parametrize("datasets,message", [
    ([{"name": "a", "train": "t"}], "needs name, train and val"),
    ([{"name": "a", "train": "t", "val": "v", "epochz": 3}], "unknown keys \\['epochz'\\]"),
    ([{"name": "a", "train": "t", "val": "v", "quick": {"lrz": [1]}}], "'lrz' is not an eval.\\* setting; did you "
                                                                         "mean 'lrs'"),
    ([{"name": "a", "train": "t", "val": "v"}, {"name": "a", "train": "t", "val": "v"}], "distinct names"),
])
def test_a_wrong_suite_names_the_problem(datasets, message):
    with pytest.raises(ConfigError, match=message):
        suite_of(EvalConfig(suite="demo", datasets=datasets))
    with pytest.raises(ConfigError, match="no such suite file"):
        suite_of(EvalConfig(suite="nowhere.yaml"))


def two_datasets(tmp_path, steps=(10, 20)) -> list[dict]:
    for step in steps:
        export_of(tmp_path / "run", step, tiny_encoder(step))
    out = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        out.append({"name": name, "train": labelled_shards(root, "train", 16), "val": labelled_shards(root, "val", 8)})
    return out


def test_a_worker_probes_every_dataset_and_writes_the_suite_mean(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    datasets = two_datasets(tmp_path)
    w = EvalWorker(RunDir(tmp_path / "run"), EvalConfig(suite="demo", datasets=datasets, **QUICK),
                   tb_dir=str(tmp_path / "tb"))
    caplog.set_level("INFO", logger="xtra_ds.eval")
    assert w.run_loop(once=True) == 0
    w.close()
    for step in (10, 20):
        table = json.loads((tmp_path / "run" / suite_results("demo", step)).read_text())
        rows = {r["dataset"]: r["linear_top1"] for r in table["rows"]}
        assert set(rows) == {"a", "b"} and table["mean"]["linear"] == pytest.approx((rows["a"] + rows["b"]) / 2)
        md = (tmp_path / "run" / suite_results("demo", step)).with_suffix(".md").read_text()
        assert "| probe | a | b | **Avg.** |" in md and f"**{100 * table['mean']['linear']:.1f}**" in md
    assert "suite demo mean linear top-1" in caplog.text
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/suite/demo/linear_top1_mean")] == [10, 20]
    assert {"eval/a/linear_top1", "eval/b/linear_top1"} <= set(acc.Tags()["scalars"])


def test_workers_sharing_a_suite_write_its_record_once(tmp_path, s3):
    """A Slurm array, one job per dataset (eval.only), on one s3:// run directory: every (dataset, export) once,
    and each export's suite record — and its TensorBoard mean — written exactly once, by whichever job recorded the
    export's last dataset."""
    import threading

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    datasets = two_datasets(tmp_path / "local")
    run = RunDir(f"s3://{s3['bucket']}/run", s3["options"])
    for step in (10, 20):
        for f in ("meta.json", "encoder.safetensors"):
            run.fs.put_file(str(tmp_path / f"local/run/exports/step_{step:08d}/{f}"),
                            run.path(f"exports/step_{step:08d}/{f}"))
    workers = [EvalWorker(RunDir(run.url, s3["options"]), EvalConfig(suite="demo", datasets=datasets, only=[name],
                                                                      **QUICK),
                          storage_options=s3["options"], tb_dir=str(tmp_path / f"tb_{name}")) for name in ("a", "b")]
    threads = [threading.Thread(target=w.run_loop, kwargs={"once": True}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for w in workers:  # the next look at the run (a poll): a job that missed the other's last record writes now
        assert w.run_loop(once=True) == 0
        w.close()
    for step in (10, 20):
        table = json.loads(run.fs.cat_file(run.path(suite_results("demo", step))))
        assert [r["dataset"] for r in table["rows"]] == ["a", "b"] and table["mean"]["linear"] is not None
    written = 0
    for name in ("a", "b"):
        folder = tmp_path / f"tb_{name}" / "eval"
        if folder.exists():
            acc = EventAccumulator(str(folder))
            acc.Reload()
            if "eval/suite/demo/linear_top1_mean" in acc.Tags()["scalars"]:
                written += len(acc.Scalars("eval/suite/demo/linear_top1_mean"))
    assert written == 2  # one point per export in all, whichever job wrote it


def test_a_failed_dataset_leaves_the_mean_unwritten_and_says_why(tmp_path, caplog):
    datasets = two_datasets(tmp_path, steps=(10,))
    f = tmp_path / "run/exports/step_00000010/encoder.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # every dataset's evaluation of it fails
    caplog.set_level("WARNING", logger="xtra_ds.eval")
    w = EvalWorker(RunDir(tmp_path / "run"), EvalConfig(suite="demo", datasets=datasets, **QUICK),
                   tb_dir=str(tmp_path / "tb"))
    assert w.run_loop(once=True) == 0
    w.close()
    table = json.loads((tmp_path / "run" / suite_results("demo", 10)).read_text())
    assert table["mean"] == {"linear": None} and "a (failed:" in table["why_no_mean"]["linear"]
    assert "suite demo has no mean" in caplog.text and "not a readable safetensors" in caplog.text
    assert "No mean" in (tmp_path / "run" / suite_results("demo", 10)).with_suffix(".md").read_text()


def test_the_offline_protocol_runs_a_suite_and_prints_the_papers_table(tmp_path):
    """launchers/probe.py --suite: every dataset with the suite's own settings, then one table with a column per
    benchmark and the average (written as OUT.json and OUT.md)."""
    import subprocess
    import sys

    import yaml

    datasets = two_datasets(tmp_path, steps=(10,))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({
        "name": "pair", "root": str(tmp_path),
        "defaults": {"protocol": {"probes": ["linear"], "batch_size": 8, "lrs": [0.01]}},
        "datasets": [{**d, "title": d["name"].upper(), "train": str(Path(d["train"]).relative_to(tmp_path)),
                      "protocol": {"epochs": 1 + i}} for i, d in enumerate(datasets)]}))
    r = subprocess.run([sys.executable, str(ROOT / "launchers/probe.py"), str(tmp_path / "run/exports/step_00000010"),
                        "--suite", str(tmp_path / "suite.yaml"), "--workers", "0", "--device", "cpu",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out.json").read_text())
    assert [res["epochs"] for res in summary["per_dataset"].values()] == [1, 2]  # each dataset its own settings
    rows = {row["dataset"]: row["linear_top1"] for row in summary["rows"]}
    assert summary["mean"]["linear"] == pytest.approx(sum(rows.values()) / 2)
    table = (tmp_path / "out.md").read_text()
    assert "| probe | A | B | **Avg.** |" in table and table in r.stdout


def test_a_job_array_task_picks_its_dataset_of_the_suite(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_worker", ROOT / "launchers/eval_worker.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    cfg = EvalConfig(suite=str(ROOT / "ds_configs/eval/paper15.yaml"))
    assert launcher.suite_dataset(cfg, "2") == "cifar10"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "14")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert launcher.suite_dataset(cfg, "array") == "infograph"
    with pytest.raises(ConfigError, match="suite paper15 has datasets 0..14"):
        launcher.suite_dataset(cfg, "15")


def test_a_suite_dataset_with_the_wrong_class_count_is_refused_at_start(tmp_path):
    datasets = two_datasets(tmp_path, steps=(10,))
    datasets[1]["classes"] = 47  # the shards hold 2
    with pytest.raises(ConfigError, match="suite dataset b: .* has 2 classes, the suite says 47"):
        EvalWorker(RunDir(tmp_path / "run"), EvalConfig(suite="demo", datasets=datasets, **QUICK),
                   tb_dir=str(tmp_path / "tb"))
