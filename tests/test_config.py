from dataclasses import replace
from pathlib import Path

import pytest

from xtra_ds.config import Config, ConfigError, batch_plan, deepspeed_dict, derive, load_config, save_config
from xtra_ds.config.derive import BatchPlan, sizes_from_config
from xtra_ds.config.schema import OptimConfig

RECIPES = sorted((Path(__file__).parents[1] / "ds_configs").glob("*.yaml"))


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"xtra_vit_b16_in1k", "xtra_vit_h14_in21k", "tiny_cpu"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_round_trip(recipe, tmp_path):
    cfg = load_config(recipe)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_paper_recipes():
    h = load_config(RECIPES[0].parent / "xtra_vit_h14_in21k.yaml")
    assert (h.model.name, h.model.img_size, h.model.block_size, h.model.drop_path) == ("xtra_vit_huge_patch14", 224, 4,
                                                                                       0.2)
    assert (h.optim.global_batch_size, h.optim.micro_batch_size, h.optim.lr, h.optim.betas, h.optim.weight_decay) == \
        (2088, 29, 1e-3, [0.9, 0.95], 0.05)
    sched = h.schedule
    assert (sched.epochs, sched.warmup_epochs, sched.warmup_start_lr, sched.final_lr) == (100, 3, 1e-4, 1e-6)
    assert (batch_plan(h.optim, 72).micro_batch, batch_plan(h.optim, 72).accum) == (29, 1)
    b = load_config(RECIPES[0].parent / "xtra_vit_b16_in1k.yaml")
    assert (b.model.name, b.model.img_size, b.schedule.epochs, b.schedule.warmup_epochs) == ("xtra_vit_base_patch16",
                                                                                             256, 800, 15)
    assert b.data.crop_scale == [0.3, 1.0] and b.data.crop_ratio == [0.75, 1.5]


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "model.grad_checkpointing=true",
                             "data.storage_options={endpoint_url: http://127.0.0.1:9}",
                             "schedule.epochs=2", "model.overrides={depth: 3}"])
    assert cfg.optim.lr == 3e-4 and cfg.model.grad_checkpointing is True
    assert cfg.data.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert sizes_from_config(cfg.model, cfg.objective).depth == 3


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr': did you mean 'optim.lr'"),
    (["modle.name=x"], "unknown config key 'modle': did you mean 'model'"),
    (["model.img_size=250"],
     r"model.img_size=250 is not divisible by patch_size × block_size = 16 × 4 = 64.*"
     r"Use model.img_size in \[192, 256, 320\]"),
    (["model.attention=flash"], "model.attention='flash': expected one of sdpa, flex"),
    (["model.name=xtra_vit_hug_patch14"], "did you mean 'xtra_vit_huge_patch14'"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["objective.loss=huber"], "objective.loss='huber': expected one of mse, l1"),
    (["deepspeed.precision=bf61"], "did you mean 'bf16'"),
    (["optim.global_batch_size=100", "data.streams=30"], "data.streams=30 must divide optim.global_batch_size=100"),
    (["data.on_order_change=skip"], "data.on_order_change='skip': expected one of refuse, next_epoch"),
    (["optim.lr"], "not of the form key=value"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_batch_plan_and_world_size():
    cfg = load_config(None, ["optim.global_batch_size=2088", "optim.micro_batch_size=29"])
    assert batch_plan(cfg.optim, 72) == BatchPlan(2088, 29, 1, 72)
    assert batch_plan(cfg.optim, 8) == BatchPlan(2088, 29, 9, 8)
    # the global batch stays; micro batch and accumulation adapt, shares of 130 or 131 when 16 does not divide it
    uneven = batch_plan(cfg.optim, 16)
    assert uneven == BatchPlan(2088, 27, 5, 16) and not uneven.even and batch_plan(cfg.optim, 72).even
    assert batch_plan(cfg.optim, 2088) == BatchPlan(2088, 1, 1, 2088)
    with pytest.raises(ConfigError, match=r"a world of 2089 ranks cannot split .* any world size from 1 to 2088"):
        batch_plan(cfg.optim, 2089)


def test_no_batch_plan_makes_an_empty_micro_batch():
    """Every split the plan accepts gives every rank the same number of micro batches, none empty and none over
    the micro batch size; the ones it refuses name a micro batch size and world sizes that work."""
    from xtra_ds.data.order import micro_splits

    refused = 0
    for total in range(1, 41):
        for world in range(1, total + 1):
            for micro in range(1, total + 1):
                optim = OptimConfig(global_batch_size=total, micro_batch_size=micro)
                try:
                    plan = batch_plan(optim, world)
                except ConfigError as e:
                    refused += 1
                    fix = int(str(e).split("Use optim.micro_batch_size=")[1].split()[0])
                    assert batch_plan(replace(optim, micro_batch_size=fix), world).accum >= 1
                    continue
                for share in {total // world, -(-total // world)}:
                    sizes = micro_splits(share, plan.accum)
                    assert len(sizes) == plan.accum and 1 <= min(sizes) and max(sizes) <= plan.micro_batch <= micro
    assert refused  # e.g. 8 images, micro batch 1, 3 ranks: shares of 2 and 3 cannot both make 3 micro batches
    with pytest.raises(ConfigError, match=r"share of 2 cannot fill 3 .*micro_batch_size=2 or more, or a world size "
                                          r"that divides 8 \(1, 2, 4, 8\)"):
        batch_plan(OptimConfig(global_batch_size=8, micro_batch_size=1), 3)


def test_deepspeed_dict_is_derived():
    cfg = load_config(None, ["optim.global_batch_size=64", "optim.micro_batch_size=8", "optim.grad_clip=0.5"])
    d = deepspeed_dict(cfg, batch_plan(cfg.optim, 2))
    assert (d["train_batch_size"], d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) == (64, 8, 4)
    assert d["gradient_clipping"] == 0.5 and d["bf16"] == {"enabled": True} and d["zero_optimization"]["stage"] == 3
    cfg.deepspeed.extra = {"train_batch_size": 128}
    with pytest.raises(ConfigError, match="contradicts the batch derived from optim"):
        deepspeed_dict(cfg, batch_plan(cfg.optim, 2))
    cfg.deepspeed.extra = {"zero_optimization": {"stage3_max_reuse_distance": 5}}
    assert deepspeed_dict(cfg, batch_plan(cfg.optim, 2))["zero_optimization"]["stage3_max_reuse_distance"] == 5


def test_missing_recipe_lists_recipes():
    with pytest.raises(ConfigError, match="not found; recipes: .*tiny_cpu"):
        load_config("ds_configs/nope.yaml")


def test_defaults_build():
    assert isinstance(Config().model.name, str)
    cfg = load_config(RECIPES[0].parent / "tiny_cpu.yaml")
    assert sizes_from_config(cfg.model, cfg.objective).num_blocks == 16


def test_run_plan_honours_samples_per_epoch():
    """The paper's recipes fix an epoch at ImageNet's size: the schedule follows it, not the shards."""
    b16 = load_config(RECIPES[0].parent / "xtra_vit_b16_in1k.yaml")
    plan = derive(b16, batch_plan(b16.optim, 72), data_samples=1_200_000)  # say, a copy with duplicates removed
    assert plan.samples_per_epoch == 1281167 and plan.steps_per_epoch == 1281167 // 2088 == 613
    assert plan.total_steps == 800 * 613 and plan.warmup_steps == 15 * 613
    cfg = load_config(None, ["schedule.epochs=2", "schedule.warmup_epochs=0.5", "optim.global_batch_size=100",
                             "optim.micro_batch_size=25"])
    plan = derive(cfg, batch_plan(cfg.optim, 4), data_samples=1050)
    assert (plan.samples_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (1050, 10, 20, 5)
    assert plan.batch == BatchPlan(100, 25, 1, 4)


def test_only_real_secrets_are_masked_and_masked_values_are_never_sent(caplog):
    from xtra_ds.storage import MASK, mask_secrets, storage_options_for

    options = {"endpoint_url": "http://minio:9000", "key": "AKIA", "secret": "s3cr3t",
               "client_kwargs": {"aws_session_token": "tok", "region_name": "eu-west-1"},
               "s3_additional_kwargs": {"SSEKMSKeyId": "arn:aws:kms:key/1", "ServerSideEncryption": "aws:kms"}}
    masked = mask_secrets(options)
    assert masked["key"] == masked["secret"] == masked["client_kwargs"]["aws_session_token"] == MASK
    assert masked["s3_additional_kwargs"]["SSEKMSKeyId"] == "arn:aws:kms:key/1"  # not a secret
    assert masked["client_kwargs"]["region_name"] == "eu-west-1" and masked["endpoint_url"] == "http://minio:9000"
    with caplog.at_level("WARNING"):
        sent = storage_options_for("s3://bucket/run", masked)  # what a reader of config.yaml builds
    assert MASK not in repr(sent)
    assert sent["client_kwargs"] == {"region_name": "eu-west-1", "endpoint_url": "http://minio:9000"}
    assert "client_kwargs.aws_session_token is masked" in caplog.text and "key is masked" in caplog.text


def test_secret_overrides_are_named_never_repeated():
    from xtra_ds.config import parse_overrides
    from xtra_ds.storage import secrets_in

    given = parse_overrides(["data.storage_options={key: AKIA1, secret: SENTINEL, client_kwargs: {region_name: x}}",
                             "optim.lr=1e-3", "data.storage_options.client_kwargs.aws_session_token=T"])
    assert sorted(secrets_in(given)) == ["data.storage_options.client_kwargs.aws_session_token",
                                         "data.storage_options.key", "data.storage_options.secret"]
    assert secrets_in(parse_overrides(["data.storage_options={endpoint_url: http://x, anon: true}"])) == []


def test_env_file_sets_variables_and_says_only_their_names(tmp_path, monkeypatch, caplog):
    from xtra_ds.storage import load_env_file

    env = tmp_path / "s3.env"
    env.write_text("# credentials for the bucket\nexport AWS_ACCESS_KEY_ID=AKIA2\n"
                   "AWS_SECRET_ACCESS_KEY='SENTINEL2'\n\n")
    env.chmod(0o644)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING"):
        assert load_env_file(env) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    import os

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "SENTINEL2" and "chmod 600" in caplog.text
    env.write_text("AWS_SECRET_ACCESS_KEY SENTINEL3\n")
    with pytest.raises(ValueError, match="line 1: expected KEY=VALUE") as e:
        load_env_file(env)
    assert "SENTINEL3" not in str(e.value)


def test_credentials_in_deepspeed_env_are_warned_about(tmp_path, monkeypatch, caplog):
    """DeepSpeed's runner turns every line of .deepspeed_env into `export K=V` in a command it logs and runs on
    every node: a credential there is named in a warning (never its value), with the ways that print nothing."""
    from xtra_ds.engine.builder import credentials

    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nAWS_SECRET_ACCESS_KEY=SENTINEL5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with caplog.at_level("WARNING"):
        credentials(load_config(None), is_main=True)
    assert "sets AWS_SECRET_ACCESS_KEY: DeepSpeed's runner prints every line" in caplog.text
    assert "env_file=PATH" in caplog.text and "SENTINEL5" not in caplog.text and "NCCL_DEBUG" not in caplog.text
