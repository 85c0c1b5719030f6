"""The ``base:`` key: a recipe that names the recipe it changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from xtra_ds.config import ConfigError, load_config

# --- the base: key --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_base_is_read_first_and_each_file_overrides_it(tmp_path, monkeypatch):
    write(tmp_path / "recipes/root.yaml", "model: {name: xtra_vit_tiny_patch16, img_size: 64, block_size: 2, "
                                          "overrides: {pred_width: 96}}\noptim: {lr: 1.0e-3, betas: [0.9, 0.95]}\n")
    write(tmp_path / "recipes/sub/mid.yaml", "base: ../root.yaml\n"
                                             "model: {block_size: 1, overrides: {proj_hidden: 128}}\n"
                                             "optim: {betas: [0.8, 0.9]}\n")
    leaf = write(tmp_path / "recipes/sub/leaf.yaml", "base: mid.yaml\nmodel: {pred_depth: 2}\n")
    monkeypatch.chdir(tmp_path)  # a base is found relative to the file naming it, wherever the tool runs
    cfg = load_config(leaf, ["optim.lr=5e-4"])
    assert (cfg.model.name, cfg.model.img_size, cfg.model.block_size, cfg.model.pred_depth) == \
        ("xtra_vit_tiny_patch16", 64, 1, 2)  # mappings merge key by key
    assert cfg.model.overrides == {"proj_hidden": 128}  # as an override does: another tool's mapping is replaced
    assert (cfg.optim.lr, cfg.optim.betas) == (5e-4, [0.8, 0.9])  # lists are replaced; overrides come last


def test_a_base_loop_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: ./a.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base: './a.yaml' makes a loop \(.*a.yaml -> .*b.yaml -> "
                                          r".*a.yaml\)"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("text,message", [
    ("base: nope.yaml\n", r"x.yaml: base: 'nope.yaml' not found \(looked for .*nope.yaml; a base is relative to "
                          r"the file that names it\)"),
    ("base: [a.yaml, b.yaml]\n", r"x.yaml: base: expected the path of one recipe, relative to this file"),
    ("base:\n", r"x.yaml: base: expected the path of one recipe"),
])
def test_a_bad_base_names_the_file_and_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "x.yaml", text))

