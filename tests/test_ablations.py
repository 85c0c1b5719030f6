"""The paper's ablation recipes (ds_configs/ablations/) and the ``base:`` key that composes recipes.

Every official ablation config has an overlay here. Each overlay must build the model the official
config builds — parameter counts per part equal to the official code's — and change, relative to the
ablation baseline, exactly the settings its official file changes.

Where the official numbers come from (OFFICIAL_SOURCE, OFFICIAL_COMMIT): the official configs are read
as the official ``Config`` reads them (config/base.yaml, then the ablation file over it, nested keys
flattened to ``enc_block_size`` etc.), and the counts are taken two ways that agree exactly for all 20:

1. the official module definitions, src/modules/vit.py and src/modules/mlp.py (they import only torch),
   instantiated as ``XTRA.__init__`` in src/modules/xtra.py composes them: ``enc = vit_base(**enc)``;
   ``proj = MLPHead(768, **proj)``; ``predictor = vit_predictor(embed_dim=proj.out_dim,
   max_seq_len=enc.max_seq_len, **predictor)``; ``aim.num_tokens`` × ``MLPHead(in, 3·crop², **aim.proj)``
   with in = out_dim·block_size² when the encoder is block-causal, else out_dim, and crop = patch·block_size
   when block-causal, else patch;
2. by hand from those layer definitions (d = 768, w = proj.out_dim, p = patch, N = (img/p)², k = block size,
   1 when the file makes the model causal instead of block-causal, n = aim.num_tokens), a ViT block of
   width x holding 12x² + 13x parameters (2 LayerNorms 4x, qkv 3x² + 3x, proj x² + x, fc1 4x² + 4x,
   fc2 4x² + x):

   encoder   = 3p²d + d + Nd + 12·(12d² + 13d) + 2d
   proj      = 768·4096 + 4096 + 4096·w                      (last layer without bias)
   predictor = Nw + depth·(12w² + 13w) + 2w
   pixel head = n·(k²w·6144 + 6144 + 6144·3(pk)² + 3(pk)²)

The ``width_1.0x`` row is the paper's B/16 model (DESIGN.md: 300,053,248).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xtra_ds.config import ConfigError, batch_plan, config_to_dict, derive, load_config, save_config, sizes_from_config
from xtra_ds.costs import forward_flops, train_flops_per_image
from xtra_ds.models import XTRA
from xtra_ds.objective import NextBlockLoss

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "ds_configs" / "ablations"
B16_RECIPE = ROOT / "ds_configs" / "xtra_vit_b16_in1k.yaml"
OFFICIAL_SOURCE = "github.com/elad-amrani/xtra: config/base.yaml, config/ablations/, src/modules/{xtra,vit,mlp}.py"
OFFICIAL_COMMIT = "e711fb550a55be26ae7fbf012131b347e4631037"

# overlay -> (official file under config/ablations/, parameters per part as the official code builds them)
OFFICIAL = {
    "baseline": ("baseline.yaml", (85_843_200, 4_722_688, 14_294_784, 113_264_640)),
    "block_1x16x16": ("block/block_1x16x16.yaml", (85_843_200, 4_722_688, 14_294_784, 7_084_800)),
    "block_1x32x32": ("block/block_1x32x32.yaml", (85_843_200, 4_722_688, 14_294_784, 28_320_768)),
    "block_2x16x16": ("block/block_2x16x16.yaml", (85_843_200, 4_722_688, 14_294_784, 14_169_600)),
    "block_2x32x32": ("block/block_2x32x32.yaml", (85_843_200, 4_722_688, 14_294_784, 56_641_536)),
    "block_2x64x64": ("block/block_2x64x64.yaml", (85_843_200, 4_722_688, 14_294_784, 226_529_280)),
    "predictor_depth_1": ("predictor/depth_1.yaml", (85_843_200, 4_722_688, 1_873_536, 113_264_640)),
    "predictor_depth_2": ("predictor/depth_2.yaml", (85_843_200, 4_722_688, 3_648_000, 113_264_640)),
    "predictor_depth_4": ("predictor/depth_4.yaml", (85_843_200, 4_722_688, 7_196_928, 113_264_640)),
    "predictor_depth_16": ("predictor/depth_16.yaml", (85_843_200, 4_722_688, 28_490_496, 113_264_640)),
    "predictor_width_0.25x": ("predictor/width_0.25x.yaml", (85_843_200, 3_936_256, 3_608_448, 94_390_272)),
    "predictor_width_0.75x": ("predictor/width_0.75x.yaml", (85_843_200, 5_509_120, 32_059_008, 132_139_008)),
    "predictor_width_1.0x": ("predictor/width_1.0x.yaml", (85_843_200, 6_295_552, 56_901_120, 151_013_376)),
    "res224_block_1x14x14": ("resolution/block_1x14x14_res_224.yaml", (85_704_960, 4_722_688, 14_294_784, 5_978_700)),
    "res224_block_1x16x16": ("resolution/block_1x16x16_res_224.yaml", (85_797_120, 4_722_688, 14_271_744, 7_084_800)),
    "res224_block_1x28x28": ("resolution/block_1x28x28_res_224.yaml", (85_704_960, 4_722_688, 14_294_784,
                                                                       23_896_368)),
    "res224_block_1x32x32": ("resolution/block_1x32x32_res_224.yaml", (85_797_120, 4_722_688, 14_271_744,
                                                                       28_320_768)),
    "res224_block_1x56x56": ("resolution/block_1x56x56_res_224.yaml", (85_704_960, 4_722_688, 14_294_784,
                                                                       95_567_040)),
    "loss_l1": ("loss/l1_loss.yaml", (85_843_200, 4_722_688, 14_294_784, 113_264_640)),
    "ar_pseudo_random": ("ar_pattern/pesudo_random.yaml", (85_843_200, 4_722_688, 14_294_784, 113_264_640)),
}
OFFICIAL_TOTALS = {  # the sums above, as the official code prints them (a check on the table)
    "baseline": 218_125_312, "block_1x16x16": 111_945_472, "block_1x32x32": 133_181_440,
    "block_2x16x16": 119_030_272, "block_2x32x32": 161_502_208, "block_2x64x64": 331_389_952,
    "predictor_depth_1": 205_704_064, "predictor_depth_2": 207_478_528, "predictor_depth_4": 211_027_456,
    "predictor_depth_16": 232_321_024, "predictor_width_0.25x": 187_778_176, "predictor_width_0.75x": 255_550_336,
    "predictor_width_1.0x": 300_053_248, "res224_block_1x14x14": 110_701_132, "res224_block_1x16x16": 111_876_352,
    "res224_block_1x28x28": 128_618_800, "res224_block_1x32x32": 133_112_320, "res224_block_1x56x56": 200_289_472,
    "loss_l1": 218_125_312, "ar_pseudo_random": 218_125_312,
}

# What each official file changes relative to the ablation baseline, in this project's keys (run_dir aside).
CHANGES = {
    "baseline": {},
    "block_1x16x16": {"model.block_size": 1},
    "block_1x32x32": {"model.block_size": 2},
    "block_2x16x16": {"model.block_size": 1, "objective.heads_ahead": 2},
    "block_2x32x32": {"model.block_size": 2, "objective.heads_ahead": 2},
    "block_2x64x64": {"objective.heads_ahead": 2},
    "predictor_depth_1": {"model.pred_depth": 1},
    "predictor_depth_2": {"model.pred_depth": 2},
    "predictor_depth_4": {"model.pred_depth": 4},
    "predictor_depth_16": {"model.pred_depth": 16},
    "predictor_width_0.25x": {"model.overrides": {"pred_width": 192}},
    "predictor_width_0.75x": {"model.overrides": {"pred_width": 576}},
    "predictor_width_1.0x": {"model.overrides": {"pred_width": 768}},
    "res224_block_1x14x14": {"model.name": "xtra_vit_base_patch14", "model.img_size": 224, "model.block_size": 1},
    "res224_block_1x16x16": {"model.img_size": 224, "model.block_size": 1},
    "res224_block_1x28x28": {"model.name": "xtra_vit_base_patch14", "model.img_size": 224, "model.block_size": 2},
    "res224_block_1x32x32": {"model.img_size": 224, "model.block_size": 2},
    "res224_block_1x56x56": {"model.name": "xtra_vit_base_patch14", "model.img_size": 224},
    "loss_l1": {"objective.loss": "l1"},
    "ar_pseudo_random": {"objective.block_order": "random"},
}

# The shape each overlay is meant to give: (img px, patch px, block k, heads ahead, predictor depth, predictor
# width, loss, block order). Block px = patch × k; the official file names say heads × block px × block px.
SHAPES = {
    "baseline": (256, 16, 4, 1, 8, 384, "mse", "raster"),
    "block_1x16x16": (256, 16, 1, 1, 8, 384, "mse", "raster"),
    "block_1x32x32": (256, 16, 2, 1, 8, 384, "mse", "raster"),
    "block_2x16x16": (256, 16, 1, 2, 8, 384, "mse", "raster"),
    "block_2x32x32": (256, 16, 2, 2, 8, 384, "mse", "raster"),
    "block_2x64x64": (256, 16, 4, 2, 8, 384, "mse", "raster"),
    "predictor_depth_1": (256, 16, 4, 1, 1, 384, "mse", "raster"),
    "predictor_depth_2": (256, 16, 4, 1, 2, 384, "mse", "raster"),
    "predictor_depth_4": (256, 16, 4, 1, 4, 384, "mse", "raster"),
    "predictor_depth_16": (256, 16, 4, 1, 16, 384, "mse", "raster"),
    "predictor_width_0.25x": (256, 16, 4, 1, 8, 192, "mse", "raster"),
    "predictor_width_0.75x": (256, 16, 4, 1, 8, 576, "mse", "raster"),
    "predictor_width_1.0x": (256, 16, 4, 1, 8, 768, "mse", "raster"),
    "res224_block_1x14x14": (224, 14, 1, 1, 8, 384, "mse", "raster"),
    "res224_block_1x16x16": (224, 16, 1, 1, 8, 384, "mse", "raster"),
    "res224_block_1x28x28": (224, 14, 2, 1, 8, 384, "mse", "raster"),
    "res224_block_1x32x32": (224, 16, 2, 1, 8, 384, "mse", "raster"),
    "res224_block_1x56x56": (224, 14, 4, 1, 8, 384, "mse", "raster"),
    "loss_l1": (256, 16, 4, 1, 8, 384, "l1", "raster"),
    "ar_pseudo_random": (256, 16, 4, 1, 8, 384, "mse", "random"),
}
PARTS = ("enc", "proj", "predictor", "aim_proj")


def overlay(name: str) -> Path:
    return ABLATIONS / f"{name}.yaml"


def flat(cfg) -> dict:
    """The resolved config as {"section.key": value}; mappings inside a section (model.overrides) stay whole."""
    out = {}
    for section, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            out |= {f"{section}.{key}": v for key, v in value.items()}
        else:
            out[section] = value
    return out


def changes(cfg, base) -> dict:
    mine, theirs = flat(cfg), flat(base)
    return {key: value for key, value in mine.items() if value != theirs[key] and key != "run_dir"}


def test_every_official_ablation_has_an_overlay():
    assert {p.stem for p in ABLATIONS.glob("*.yaml")} == set(OFFICIAL)
    assert set(OFFICIAL) == set(OFFICIAL_TOTALS) == set(CHANGES) == set(SHAPES)
    assert {name: sum(parts) for name, (_, parts) in OFFICIAL.items()} == OFFICIAL_TOTALS


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_overlay_builds_the_official_model(name):
    cfg = load_config(overlay(name))
    with torch.device("meta"):
        model = XTRA(sizes_from_config(cfg.model, cfg.objective))
    got = tuple(sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS)  # PARTS' order
    official_file, official = OFFICIAL[name]
    assert got == official, (f"{name}: {got} parameters in {PARTS}, not the model of the official "
                             f"config/ablations/{official_file} @ {OFFICIAL_COMMIT[:7]}: {official}")

    img, patch, k, heads, depth, width, loss, order = SHAPES[name]
    s = model.sizes
    assert (s.img_size, s.patch_size, s.block_size) == (img, patch, k)
    assert s.num_blocks == (img // (patch * k)) ** 2
    assert model.enc.mask.dense().shape == (s.num_tokens, s.num_tokens)
    assert len(model.predictor.blocks) == depth and model.predictor.pos_embed.shape[-1] == width
    assert model.proj.mlp[2].out_features == width
    assert len(model.aim_proj) == heads
    for head in model.aim_proj:  # a block's k² predictor outputs in, its 3·(p·k)² pixels out
        assert (head.mlp[0].in_features, head.mlp[2].out_features) == (k * k * width, 3 * (patch * k) ** 2)
    assert NextBlockLoss(cfg.objective.loss).kind == loss
    assert cfg.objective.block_order == order
    if order == "random":  # as many fixed orders as blocks, as the official code draws
        assert model.block_orders.shape == (s.num_blocks, s.num_blocks)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_overlay_changes_only_what_its_official_file_changes(name):
    cfg, base = load_config(overlay(name)), load_config(overlay("baseline"))
    assert changes(cfg, base) == CHANGES[name]
    assert cfg.run_dir == f"runs/ablations/{name}"  # its own run: resume=auto never picks up another ablation


def test_the_baseline_is_the_b16_recipe_with_the_ablation_settings():
    cfg, b16 = load_config(overlay("baseline")), load_config(B16_RECIPE)
    assert changes(cfg, b16) == {"model.drop_path": 0.0, "model.overrides": {"pred_width": 384},
                                 "schedule.epochs": 100, "schedule.warmup_epochs": 10}


@pytest.mark.parametrize("name", ["baseline", "res224_block_1x14x14"])
def test_a_run_stores_the_resolved_overlay(name, tmp_path):
    """The config.yaml a run writes is whole (no base: key): the eval worker and a resume read it alone."""
    cfg = load_config(overlay(name), ["optim.lr=5e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert load_config(tmp_path / "config.yaml") == cfg


def test_the_config_cli_resolves_an_overlay_as_training_does():
    """slurm_pretrain.sbatch asks `python -m xtra_ds.config --get run_dir RECIPE …` with what training gets:
    a file naming its base is one path, so every tool that takes a recipe reads an ablation unchanged."""
    out = subprocess.run([sys.executable, "-m", "xtra_ds.config", "--get", "run_dir", str(overlay("predictor_depth_4")),
                          "schedule.epochs=1"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "runs/ablations/predictor_depth_4"


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


# --- docs/REPRODUCING.md --------------------------------------------------------------------

PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 (xtra_ds.costs.PEAK_BF16_FLOPS)
IN1K_TRAIN, IN1K_VAL, PROBE_EPOCHS = 1_281_167, 50_000, 100


def hours(flop: float, mfu: float) -> str:
    return f"{flop / (mfu * PEAK) / 3600:.1f}"


def pretraining(recipe: Path) -> tuple[int, int, float]:
    """(images trained, training FLOPs per image, encoder forward FLOPs per image) of a recipe's run."""
    cfg = load_config(recipe)
    plan = derive(cfg, batch_plan(cfg.optim, 72), data_samples=0)
    return (plan.total_steps * plan.batch.global_batch, train_flops_per_image(plan.sizes),
            forward_flops(plan.sizes)["encoder"])


def test_the_gpu_hours_here_are_the_flop_counts():
    """Every compute figure of docs/REPRODUCING.md, recomputed from the recipes and the FLOP counts."""
    doc = (ROOT / "docs" / "REPRODUCING.md").read_text()
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in doc.splitlines()
            if line.startswith("| `")}
    for row, recipe in (("b16_in1k", B16_RECIPE), ("h14_in21k", ROOT / "ds_configs" / "xtra_vit_h14_in21k.yaml")):
        images, flop, encoder = pretraining(recipe)
        probe = encoder * (PROBE_EPOCHS * IN1K_TRAIN + IN1K_VAL)
        assert rows[row].endswith(f"| {images:,} | {flop / 1e9:.1f} | {hours(images * flop, 0.4)} | "
                                  f"{hours(images * flop, 0.5)} | {hours(probe, 0.4)} | {hours(probe, 0.5)} |"), row
    total = {0.4: 0.0, 0.5: 0.0}
    for name in OFFICIAL:
        images, flop, _ = pretraining(overlay(name))
        assert images == 61_300 * 2088
        assert rows[name].endswith(f"| {OFFICIAL_TOTALS[name]:,} | {flop / 1e9:.1f} | {hours(images * flop, 0.4)} | "
                                   f"{hours(images * flop, 0.5)} |"), name
        total = {mfu: t + images * flop for mfu, t in total.items()}
    assert f"All 20 pre-trainings: {hours(total[0.4], 0.4)} GPU-hours at 40% MFU, {hours(total[0.5], 0.5)} at 50%" \
        in doc
    images, flop, _ = pretraining(B16_RECIPE)
    assert f"= {hours(images * flop, 0.4)} GPU-hours    (0.50: {hours(images * flop, 0.5)})" in doc
