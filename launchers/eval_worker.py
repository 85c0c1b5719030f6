"""Probe every encoder export of a training run as it appears, beside the training job.

    python launchers/eval_worker.py --run-dir runs/b16 eval.train=s3://b/in1k-10pc/train eval.val=s3://b/in1k/val
    python launchers/eval_worker.py --run-dir runs/demo/tiny_cpu --once        # what is there, then exit

Settings come from the run's ``config.yaml`` (its ``eval`` section) and dotted overrides. The
worker waits for the run to start, evaluates each export once (ledger: ``eval/ledger/<dataset>/step_*.json``),
writes ``eval/<dataset>/{linear,attentive}_top1`` to TensorBoard at the export's step and the
full results to ``eval/results/``. Kill it any time and start it again: it goes on where it
stopped. SIGUSR1 asks it to finish the exports that are there and exit. See docs/EVAL.md.
"""

import signal

_DRAIN = []  # SIGUSR1 before the worker exists (torch takes seconds to import) is kept, not fatal
signal.signal(signal.SIGUSR1, lambda signum, frame: _DRAIN.append(signum))

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from xtra_ds.config import ConfigError, load_config, parse_overrides
from xtra_ds.data.remote import ShardReadError
from xtra_ds.eval.device import be_polite, pick_device
from xtra_ds.eval.features import EvalDataError
from xtra_ds.eval.suite import suite_of
from xtra_ds.eval.worker import EvalWorker
from xtra_ds.rundir import CONFIG, RunDir
from xtra_ds.storage import load_env_file


def run_config(run: RunDir, overrides: list[str], wait: bool):
    """The run's config.yaml (waiting for the run to write it) with the overrides applied."""
    text = run.read_text(CONFIG)
    if text is None and wait:
        logging.getLogger("xtra_ds.eval").info("waiting for %s (the training run writes it when it starts)",
                                               run.url_of(CONFIG))
    while text is None and wait:
        time.sleep(5)
        text = run.read_text(CONFIG)
    if text is None:
        raise ConfigError(f"{run.url_of(CONFIG)} does not exist: is --run-dir a training run directory?")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG).write_text(text)
        return load_config(str(Path(tmp) / CONFIG), overrides)


def suite_dataset(eval_cfg, index: str) -> str:
    """The name of the suite's dataset ``index`` (a number, or ``array``: this Slurm array task's)."""
    import os

    if index == "array":
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            raise ConfigError("--suite-index array: not a Slurm array task (no SLURM_ARRAY_TASK_ID)")
        index = str(int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)))
    suite = suite_of(eval_cfg)
    n = len(suite.datasets) if suite is not None else 0
    if suite is None or not index.isdigit() or int(index) >= n:
        raise ConfigError(f"--suite-index {index}: " + ("no eval.suite is set" if suite is None else
                                                         f"suite {suite.name} has datasets 0..{n - 1}"))
    return suite.datasets[int(index)].name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="the training run directory (local path or s3://…)")
    parser.add_argument("--once", action="store_true", help="evaluate the exports that are there now, then exit")
    parser.add_argument("--until-final", action="store_true",
                        help="exit once the run's final export has an outcome (done or failed), or once training has "
                        "ended (state.json: done or failed) and nothing is left to evaluate")
    parser.add_argument("--retry-failed", action="store_true", help="evaluate exports recorded as failed again")
    parser.add_argument("--suite-index", default=None, help="with eval.suite: evaluate only the suite's N-th dataset "
                        "(0-based); 'array': this Slurm array task's (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides of the run's config, e.g. eval.train=… eval.val=… eval.device=cuda:7; "
                        "data.storage_options={endpoint_url: …} also reaches an s3:// run directory, and "
                        "logging.tb_dir=/local/folder is where TensorBoard logs go for one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [eval] %(message)s", datefmt="%H:%M:%S")
    try:
        # what reaches the run directory must be known before its config.yaml can be read: its storage
        # options, and the credentials of an env_file given here
        early = parse_overrides(args.overrides)
        if early.get("env_file"):
            load_env_file(early["env_file"])
        run = RunDir(args.run_dir, early.get("data", {}).get("storage_options"))
        cfg = run_config(run, args.overrides, wait=not args.once)
        if args.suite_index is not None:
            cfg.eval.only = [suite_dataset(cfg.eval, args.suite_index)]
        if cfg.env_file and cfg.env_file != early.get("env_file"):  # the run's own (a path on this node too)
            load_env_file(cfg.env_file)
        be_polite(pick_device(cfg.eval.device), cfg.eval.threads)
        worker = EvalWorker(run, cfg.eval, tb_dir=run.tb_dir(cfg.logging.tb_dir),
                            storage_options=cfg.data.storage_options, retry_failed=args.retry_failed)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        print(f"eval worker: {e}", file=sys.stderr)
        return 2
    if _DRAIN:
        worker.request_drain()
    signal.signal(signal.SIGUSR1, lambda signum, frame: worker.request_drain())
    try:
        return worker.run_loop(once=args.once, until_final=args.until_final)
    except EvalDataError as e:  # missing or unreadable shards, unlabelled, classes numbered differently
        print(f"eval worker: {e}", file=sys.stderr)
        return 2
    except (OSError, ShardReadError) as e:  # --once, and the run directory cannot be listed
        print(f"eval worker: cannot read the run directory: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
