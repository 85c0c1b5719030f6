"""The shell around the cluster, fast and without daemons.

- scripts/local_sshd.sh and scripts/local_slurm.sh (through scripts/local_dir.sh) trust nothing already on
  disk: ``up`` refuses a DIR that exists (a symlink, a folder holding a planted key) and otherwise makes
  its own (0700, fresh from mktemp when no DIR is given); ``down`` removes only a folder ``up`` made, never
  through a symlink. The daemons' programs are stand-ins here that fail when called, so nothing starts:
  what is tested is what each script does with its folder before and after. tests/test_cluster.py runs
  the same scripts with the real daemons.
- ``python -m xtra_ds.config --get KEY``, which launchers/slurm_pretrain.sbatch asks for the run
  directory (where the ranks' pid files are) exactly as training resolves it.
"""

from __future__ import annotations

import os
import re
import runpy
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each script, the marker its `up` writes, and a key an attacker would plant for it to reuse
SCRIPTS = {
    "local_sshd.sh": (".xtra-local-sshd", "id_ed25519"),
    "local_slurm.sh": (".xtra-local-slurm", "munge/munge.key"),
}
# the programs the scripts run after making their folder: each stand-in says so and fails
STAND_INS = ("sshd", "pdsh", "ssh-keygen", "slurmctld", "munged", "mungekey")


@pytest.fixture
def env(tmp_path):
    """PATH with the failing stand-ins first, TMPDIR inside the test's folder."""
    bin_dir = tmp_path / "stand-ins"
    bin_dir.mkdir()
    for name in STAND_INS:
        (bin_dir / name).write_text(f"#!/bin/sh\necho 'stand-in {name}: nothing is started' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp")}


def script(env, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (not following symlinks): files with their bytes, folders as None."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", SCRIPTS)
def test_up_refuses_a_symlinked_dir_and_leaves_its_target_alone(env, tmp_path, name):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"  # a link to where nothing is yet, which `-e` alone would let through
    dangling.symlink_to(tmp_path / "nowhere")
    for given in (str(link), f"{link}/", str(dangling)):
        up = script(env, name, "up", given)
        assert up.returncode == 2 and "already exists" in up.stderr, (given, up.stdout, up.stderr)
    assert tree(target) == {} and not (tmp_path / "nowhere").exists()
    assert link.is_symlink() and dangling.is_symlink()


@pytest.mark.parametrize("name", SCRIPTS)
def test_down_refuses_a_symlinked_dir_and_leaves_its_target_alone(env, tmp_path, name):
    marker, _ = SCRIPTS[name]
    target = tmp_path / "target"  # as `up` would have left it: even its marker does not make a link acceptable
    target.mkdir()
    (target / marker).write_text("made by up\n")
    (target / "keep").write_text("precious\n")
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    for given in (str(link), f"{link}/"):
        down = script(env, name, "down", given)
        assert down.returncode == 2 and "is a symlink" in down.stderr, (given, down.stdout, down.stderr)
    assert link.is_symlink() and tree(target) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_up_refuses_a_dir_holding_a_planted_key(env, tmp_path, name):
    _, key = SCRIPTS[name]
    planted = tmp_path / "planted"
    (planted / key).parent.mkdir(parents=True)
    (planted / key).write_text("an attacker's key\n")
    before = tree(planted)
    up = script(env, name, "up", str(planted))
    assert up.returncode == 2 and "already exists" in up.stderr, (up.stdout, up.stderr)
    assert tree(planted) == before  # nothing authorised, configured or started with it


@pytest.mark.parametrize("name", SCRIPTS)
def test_down_refuses_a_folder_without_the_marker(env, tmp_path, name):
    folder = tmp_path / "someone-elses"
    folder.mkdir()
    (folder / "keep").write_text("precious\n")
    down = script(env, name, "down", str(folder))
    assert down.returncode == 2 and "was not made by" in down.stderr, (down.stdout, down.stderr)
    assert tree(folder) == {"keep": b"precious\n"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_up_without_dir_makes_a_fresh_private_folder_that_down_removes(env, tmp_path, name):
    marker, _ = SCRIPTS[name]
    made = []
    for _ in range(2):
        up = script(env, name, "up")
        assert "stand-in" in up.stderr and up.returncode != 0, (up.stdout, up.stderr)  # stopped before any daemon
        found = re.search(r"^folder (\S+) \(remove it with: \S+ down (\S+)\)$", up.stdout, re.M)
        assert found and found.group(1) == found.group(2), up.stdout
        folder = Path(found.group(1))
        made.append(folder)
        prefix = name.removeprefix("local_").removesuffix(".sh")
        assert folder.parent == tmp_path / "tmp" and re.fullmatch(rf"xtra-{prefix}\.\w{{6}}", folder.name), folder
        info = folder.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
        assert (folder / marker).is_file()
    assert made[0] != made[1]
    for folder in made:
        down = script(env, name, "down", str(folder))
        assert down.returncode == 0, (down.stdout, down.stderr)
        assert not folder.exists()
    assert script(env, name, "down", str(made[0])).returncode == 0  # nothing there: nothing to do


@pytest.mark.parametrize("name", SCRIPTS)
def test_down_stops_only_processes_that_name_its_folder(env, tmp_path, name):
    """A pid file naming another process (stale, reused, planted) gets nothing killed."""
    up = script(env, name, "up", str(tmp_path / "dir"))
    assert up.returncode != 0 and (tmp_path / "dir").is_dir(), (up.stdout, up.stderr)  # the stand-ins stopped it
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        pid_files = ["sshd.pid"] if name == "local_sshd.sh" else ["run/slurmctld.pid", "run/munged.pid"]
        for pid_file in pid_files:
            (tmp_path / "dir" / pid_file).write_text(f"{bystander.pid}\n")
        down = script(env, name, "down", str(tmp_path / "dir"))
        assert down.returncode == 0 and not (tmp_path / "dir").exists(), (down.stdout, down.stderr)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("name", SCRIPTS)
def test_down_needs_a_dir(env, name):
    down = script(env, name, "down")
    assert down.returncode == 2 and "usage" in down.stderr, (down.stdout, down.stderr)


def config_get(monkeypatch, capsys, *args: str) -> tuple[str, str]:
    """``python -m xtra_ds.config --get ARGS`` (in this process: the same code, without a second torch import);
    its stdout and, when it exits with an error, the message."""
    monkeypatch.setattr(sys, "argv", ["python -m xtra_ds.config", "--get", *args])
    error = ""
    try:
        runpy.run_module("xtra_ds.config", run_name="__main__")
    except SystemExit as stop:
        error = str(stop.code)
    return capsys.readouterr().out, error


def test_config_get_prints_one_resolved_value(monkeypatch, capsys):
    from xtra_ds.config import load_config

    recipe = "ds_configs/tiny_cpu.yaml"
    monkeypatch.chdir(ROOT)
    assert config_get(monkeypatch, capsys, "run_dir", recipe) == (load_config(recipe).run_dir + "\n", "")
    assert config_get(monkeypatch, capsys, "run_dir", recipe, "run_dir=/shared/runs/x") == ("/shared/runs/x\n", "")
    assert config_get(monkeypatch, capsys, "checkpoint.every_steps", recipe, "checkpoint.every_steps=7") == ("7\n", "")
    assert config_get(monkeypatch, capsys, "optim.betas", recipe, "optim.betas=[0.8,0.9]") == ("[0.8, 0.9]\n", "")
    out, error = config_get(monkeypatch, capsys, "model", recipe)
    assert not out and "model is a section, not a key" in error and "model.name" in error, error
    out, error = config_get(monkeypatch, capsys, "chekpoint.every_steps", recipe)
    assert not out and "did you mean 'checkpoint.every_steps'" in error, error
