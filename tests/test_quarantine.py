"""data.quarantine: sample keys the training loader leaves out, the way it leaves out the manifest's duplicates."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter

import pytest

from data_prep import shard as shard_tool
from xtra_ds.config.schema import ConfigError, DataConfig
from xtra_ds.data.build import training_data
from xtra_ds.data.quarantine import add_to_quarantine, parse_quarantine, read_quarantine
from xtra_ds.data.shards import fingerprint, resolve, shard_stats
from xtra_ds.data.train_loader import DataOrderChanged, TrainLoader, TrainSpec

from helpers.corpus import plain_corpus


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """31 inputs in shards of 7, one of them an exact copy of another (the manifest excludes it)."""
    root = tmp_path_factory.mktemp("quarantine")
    plain_corpus(root / "in", 30, size=(64, 48), classes=3)
    shutil.copy(root / "in/class0/img0000.jpg", root / "in/class2/zz_copy.jpg")
    assert shard_tool.main([str(root / "in"), "--output", str(root / "shards"), "--shard-samples", "7",
                            "--workers", "1", "--min-side", "16"]) == 0
    return str(root / "shards/manifest.json")


def keys_in(url: str) -> list[str]:
    return [key for key, *_ in shard_stats(url)["samples"]]


def epoch_keys(shards, world: int, **kw) -> list[list[str]]:
    """Every rank's keys of one epoch (each rank's loader on its own), and the steps each rank yielded."""
    out = []
    for rank in range(world):
        loader = TrainLoader(TrainSpec(shards, global_batch=4, img_size=16, rank=rank, world_size=world,
                                       num_workers=0, seed=2, shuffle=4, **kw))
        it = iter(loader)
        out.append([k for _ in range(loader.steps_per_epoch()) for k in next(it)["keys"]])
    return out


def test_the_file_holds_keys_and_optionally_their_shards():
    text = "# blamed by the replay of step 1200\n0000000007 s3://b/train-000002.tar\n\n0000000009\n" \
           "0000000009 s3://b/train-000004.tar  # the same key again: its shard is taken\n0000000007\n"
    assert parse_quarantine(text) == {"0000000007": "s3://b/train-000002.tar", "0000000009": "s3://b/train-000004.tar"}


def test_quarantined_keys_are_left_out_and_the_epochs_stay_balanced(manifest, tmp_path, caplog):
    """Two keys of the data (one named with its shard, one bare) and one that is not in it: the shards holding
    them count a sample fewer, the log says so, no rank ever yields them, and the ranks' epochs stay equal."""
    plain = resolve(manifest)
    named, bare = keys_in(plain[1].url)[2], keys_in(plain[3].url)[0]
    quarantine = tmp_path / "quarantine.txt"
    quarantine.write_text(f"{named} {plain[1].url}\n{bare}\nno-such-key\n")
    with caplog.at_level(logging.INFO, logger="xtra_ds.data.build"):
        data = training_data(DataConfig(train=manifest, quarantine=str(quarantine)))
    assert f"quarantine {quarantine}: 3 keys excluded (2 of them in the training data; {len(plain)} shard stats " \
           f"files read)" in caplog.text
    assert [s.num_samples for s in data.shards] == [s.num_samples - (i in (1, 3)) for i, s in enumerate(plain)]
    assert data.shards[1].quarantined == {named} and named in data.shards[1].excluded
    assert data.shards[3].quarantined == {bare} and sum(len(s.quarantined) for s in data.shards) == 2
    # the run's length in epochs does not move when keys are quarantined mid-run
    assert data.samples_per_pass == training_data(DataConfig(train=manifest)).samples_per_pass

    for world in (1, 2):
        ranks = epoch_keys(data.shards, world)
        assert len({len(keys) for keys in ranks}) == 1  # every rank yields as many steps
        counts = Counter(k for keys in ranks for k in keys)
        assert named not in counts and bare not in counts and set(counts.values()) == {1}
    everything = Counter(k for keys in epoch_keys(plain, 1) for k in keys)
    assert {named, bare} & set(everything)  # without the quarantine the epoch does read them


def test_only_the_named_shard_is_read_and_a_moved_shard_is_found_by_name(manifest, tmp_path, caplog):
    plain = resolve(manifest)
    key = keys_in(plain[2].url)[1]
    elsewhere = "s3://old-bucket/train/" + plain[2].url.rsplit("/", 1)[-1]  # the data was copied since
    for shard, reads in ((plain[2].url, 1), (elsewhere, 1), (plain[0].url, len(plain))):  # the last: wrong shard
        quarantine = tmp_path / "q.txt"
        quarantine.write_text(f"{key} {shard}\n")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xtra_ds.data.build"):
            data = training_data(DataConfig(train=manifest, quarantine=str(quarantine)))
        assert f"(1 of them in the training data; {reads} shard stats files read)" in caplog.text, shard
        assert data.shards[2].quarantined == {key}


def test_a_duplicate_the_manifest_excludes_is_not_excluded_twice(manifest, tmp_path):
    plain = resolve(manifest)
    holder = next(s for s in plain if s.excluded)
    duplicate = next(iter(holder.excluded))
    quarantine = tmp_path / "q.txt"
    quarantine.write_text(f"{duplicate}\n")
    data = training_data(DataConfig(train=manifest, quarantine=str(quarantine)))
    assert [s.num_samples for s in data.shards] == [s.num_samples for s in plain]
    assert fingerprint(data.shards) == fingerprint(plain)  # nothing changed, so the order did not either


def test_the_order_identity_names_the_quarantine(manifest, tmp_path, caplog):
    """The shard-list fingerprint is what it always was without a quarantine (an empty file included), and
    changes — naming the quarantine — with each set of quarantined keys, even one that leaves every shard's
    count as it was; a resume across the change is refused, or goes on at the next epoch."""
    plain = resolve(manifest)
    before = hashlib.sha256(json.dumps([(s.url, s.num_samples) for s in plain]).encode()).hexdigest()[:16]
    assert fingerprint(plain) == before

    def shards_with(text: str):
        quarantine = tmp_path / "q.txt"
        quarantine.write_text(text)
        return training_data(DataConfig(train=manifest, quarantine=str(quarantine))).shards

    a, b = keys_in(plain[0].url)[:2]
    assert fingerprint(shards_with("")) == before
    one, other, both = fingerprint(shards_with(f"{a}\n")), fingerprint(shards_with(f"{b}\n")), \
        fingerprint(shards_with(f"{a}\n{b}\n"))
    assert one.startswith(f"{before}+quarantine(1 key ") and both.startswith(f"{before}+quarantine(2 keys ")
    assert len({one, other, both}) == 3  # a and b: the same counts, another order

    spec = dict(global_batch=4, img_size=16, num_workers=0, seed=2, shuffle=4)
    saved = TrainLoader(TrainSpec(plain, **spec))
    next(iter(saved))
    state = saved.state_dict()
    with pytest.raises(DataOrderChanged, match=rf"another data order \(shards {before}→{before}\+quarantine\(1 key"):
        TrainLoader(TrainSpec(shards_with(f"{a}\n"), **spec)).load_state_dict(state)
    resumed = TrainLoader(TrainSpec(shards_with(f"{a}\n"), on_order_change="next_epoch", **spec))
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (1, 0)


def test_a_missing_file_is_a_config_error(manifest, tmp_path):
    with pytest.raises(ConfigError, match=f"data.quarantine={tmp_path}/none.txt: no such file"):
        training_data(DataConfig(train=manifest, quarantine=str(tmp_path / "none.txt")))


def test_the_file_on_object_storage(manifest, s3):
    """The replay appends to a quarantine file on S3 (never a key twice); training reads it from there."""
    url = f"s3://{s3['bucket']}/runs/h14/quarantine.txt"
    plain = resolve(manifest)
    a, b = keys_in(plain[0].url)[:2]
    assert add_to_quarantine(url, [(a, plain[0].url)], s3["options"]) == [a]
    assert add_to_quarantine(url, [(a, None), (b, None), (b, None)], s3["options"]) == [b]
    assert read_quarantine(url, s3["options"]) == {a: plain[0].url, b: None}
    data = training_data(DataConfig(train=manifest, quarantine=url, storage_options=s3["options"]))
    assert data.shards[0].quarantined == {a, b}


def test_a_shard_without_its_stats_file_is_named(manifest, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(resolve(manifest)[0].url.rsplit("/", 1)[0], shards)
    (shards / "shard-000001.stats.json").unlink()
    (tmp_path / "q.txt").write_text("0000000001\n")
    with pytest.raises(ConfigError, match=f"data.quarantine: cannot tell which keys {shards}/shard-000001.tar holds"):
        training_data(DataConfig(train=str(shards / "manifest.json"), quarantine=str(tmp_path / "q.txt")))
