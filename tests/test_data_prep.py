"""data_prep: accounting, formats, resume after kill -9, job arrays, tar/JSONL/S3 sources, verify."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from data_prep import finalize as finalize_tool
from data_prep import shard as shard_tool
from data_prep import verify as verify_tool

from helpers.corpus import encode, nasty_corpus, photo, plain_corpus
from helpers.loopback_http import LoopbackServer

ROOT = Path(__file__).resolve().parents[1]


def shard(*args) -> int:
    return shard_tool.main([str(a) for a in args])


def read_samples(url: str, options: dict | None = None) -> dict[str, dict]:
    """key -> {ext: bytes} of every usable sample (manifest exclusions skipped), in key order (the sorted
    input order; the shards hold a shuffle of it)."""
    client = {"client_kwargs": {"endpoint_url": options["endpoint_url"]}} if options else {}
    fs, root = fsspec.core.url_to_fs(url, **client)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    out = {}
    for s in manifest["shards"]:
        skip = set(s["excluded"])
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/{s['name']}"))) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if key not in skip:
                    out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return dict(sorted(out.items()))


def manifest_of(path) -> dict:
    m = json.loads((Path(path) / "manifest.json").read_text())
    m.pop("created")
    return m


@pytest.mark.parametrize("shard_samples", [100, 3])  # one shard (in-shard dedup) / many (cross-shard)
def test_nasty_corpus_accounting(tmp_path, shard_samples):
    expect = nasty_corpus(tmp_path / "in")
    out = tmp_path / "out"
    assert shard(tmp_path / "in", "--output", out, "--max-pixels", 1_000_000, "--workers", 1,
                 "--shard-samples", shard_samples) == 0
    m = manifest_of(out)
    t = m["totals"]
    assert t["inputs"] == len(expect) == t["written"] + t["rejected"]
    rejected = {Path(ex["source"]).relative_to(tmp_path / "in").as_posix(): r
                for r, v in m["rejections"].items() for ex in v["examples"]}
    assert rejected == {k: v[1] for k, v in expect.items() if v[0] == "rejected"}
    assert m["classes"] == {"cat": 0, "dog": 1}
    samples = read_samples(str(out))
    assert len(samples) == t["written"] == sum(v[0] == "ok" for v in expect.values())
    for entry in samples.values():
        meta = json.loads(entry["json"])
        rel = Path(meta["source"]).relative_to(tmp_path / "in").as_posix()
        im = Image.open(io.BytesIO(entry["jpg"]))
        im.load()
        assert im.mode == "RGB", rel
        assert im.size == expect[rel][1], rel
        assert int(entry["cls"]) == m["classes"][rel.split("/")[0]]
        assert meta["label"] == rel.split("/")[0] and len(meta["sha256"]) == 64
    # the EXIF-rotated image is upright: 400x300 stored, orientation 6 -> 300 wide, 400 high
    baseline = next(e for e in samples.values() if json.loads(e["json"])["source"].endswith("baseline.jpg"))
    assert baseline["jpg"] == (tmp_path / "in/cat/baseline.jpg").read_bytes()  # passed through untouched
    assert verify_tool.main(["--output", str(out), "--decode", "all"]) == 0


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    plain_corpus(tmp_path / "in", 36, size=(1600, 1200))  # resize work makes each shard take a while
    args = ["--shard-samples", "2", "--workers", "1"]
    assert shard(tmp_path / "in", "--output", tmp_path / "ref", *args) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "data_prep/shard.py"), str(tmp_path / "in"), "--output", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(out.glob("*.stats.json")))
    assert 3 <= done_at_kill < 18, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    assert shard(tmp_path / "in", "--output", out, *args) == 0  # rerun: skips finished shards
    assert manifest_of(out) == manifest_of(tmp_path / "ref")
    for tar in sorted((tmp_path / "ref").glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert not list(out.glob(".*.tmp")), "staging files are cleaned up"


def test_one_job_vs_three_jobs_and_workers(tmp_path):
    plain_corpus(tmp_path / "in", 20, size=(300, 200), classes=3)
    (tmp_path / "in/class0/dup.jpg").write_bytes((tmp_path / "in/class1/img0001.jpg").read_bytes())
    common = ["--shard-samples", "3"]
    assert shard(tmp_path / "in", "--output", tmp_path / "one", "--workers", 1, *common) == 0
    for j in range(3):
        assert shard(tmp_path / "in", "--output", tmp_path / "three", "--workers", 2, "--num-jobs", 3,
                     "--job-index", j, *common) == 0
        assert not (tmp_path / "three/manifest.json").exists()
    assert finalize_tool.main(["--output", str(tmp_path / "three")]) == 0
    assert manifest_of(tmp_path / "one") == manifest_of(tmp_path / "three")
    one, three = read_samples(str(tmp_path / "one")), read_samples(str(tmp_path / "three"))
    assert one == three and len(one) == 20
    assert manifest_of(tmp_path / "one")["rejections"]["duplicate"]["count"] == 1


def test_finalize_refuses_missing_shards(tmp_path, capsys):
    plain_corpus(tmp_path / "in", 6, size=(100, 80))
    assert shard(tmp_path / "in", "--output", tmp_path / "o", "--shard-samples", 2, "--num-jobs", 2, "--job-index",
                 0) == 0
    with pytest.raises(SystemExit):
        finalize_tool.main(["--output", str(tmp_path / "o")])
    assert "belong to job index(es) [1] of 2" in capsys.readouterr().err


def test_per_class_tar_source(tmp_path):
    for cls in ("n001", "n002"):
        with tarfile.open(tmp_path / f"{cls}.tar", "w") as tf:
            for i in range(3):
                data = encode(photo(160, 120, hash(cls) % 1000 + i), "JPEG")
                ti = tarfile.TarInfo(f"{cls}_{i}.JPEG")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    assert shard(f"{tmp_path}/*.tar", "--output", tmp_path / "out", "--workers", 1) == 0
    m = manifest_of(tmp_path / "out")
    assert m["classes"] == {"n001": 0, "n002": 1} and m["totals"]["written"] == 6
    samples = read_samples(str(tmp_path / "out"))
    assert sorted(int(s["cls"]) for s in samples.values()) == [0, 0, 0, 1, 1, 1]
    assert json.loads(next(iter(samples.values()))["json"])["source"].endswith("n001.tar::n001_0.JPEG")


def test_s3_round_trip_jsonl_source_and_verify(tmp_path, s3):
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3["endpoint"]})
    b = s3["bucket"]
    rows = []
    for i in range(7):
        fs.pipe_file(f"{b}/raw/img{i}.jpg", encode(photo(200, 150, 300 + i), "JPEG"))
        rows.append(json.dumps({"url": f"s3://{b}/raw/img{i}.jpg", "label": "ab"[i % 2], "caption": f"photo {i}"}))
    rows.append(json.dumps({"url": f"s3://{b}/raw/missing.jpg", "label": "a"}))
    fs.pipe_file(f"{b}/list.jsonl", "\n".join(rows).encode())
    ep = ["--endpoint-url", s3["endpoint"]]
    out = f"s3://{b}/shards/train"
    assert shard(f"s3://{b}/list.jsonl", "--output", out, "--shard-samples", 3, "--workers", 2, *ep) == 0
    m = json.loads(fs.cat_file(f"{b}/shards/train/manifest.json"))
    assert m["totals"] == {"inputs": 8, "written": 7, "rejected": 1, "shards": 3, "bytes": m["totals"]["bytes"]}
    assert m["rejections"]["read_error"]["examples"][0]["source"].endswith("missing.jpg")
    samples = read_samples(out, s3["options"])
    assert {json.loads(s["json"])["caption"] for s in samples.values()} == {f"photo {i}" for i in range(7)}
    assert verify_tool.main(["--output", out, *ep]) == 0
    # corrupt one shard: flip a byte in the middle
    name = m["shards"][1]["name"]
    data = bytearray(fs.cat_file(f"{b}/shards/train/{name}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{b}/shards/train/{name}", bytes(data))
    assert verify_tool.main(["--output", out, *ep]) == 1


def test_clear_errors(tmp_path, capsys, s3, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "empty", "--output", tmp_path / "o"], "no input files found"),
        ([tmp_path / "nope", "--output", tmp_path / "o"], "is neither a directory"),
        ([tmp_path / "empty", "--output", "bogus://x/y"], "cannot open 'bogus://x/y'"),
        ([tmp_path / "empty", "--output", tmp_path / "file.txt" / "sub"], "destination is not writable"),
    ]
    (tmp_path / "file.txt").write_text("not a directory")
    for args, message in cases:
        with pytest.raises(SystemExit):
            shard(*args)
        assert message in capsys.readouterr().err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # forget instances that hold credentials
    with pytest.raises(SystemExit):
        shard(tmp_path / "empty", "--output", f"s3://{s3['bucket']}/x", "--endpoint-url", s3["endpoint"])
    err = capsys.readouterr().err
    assert "no credentials" in err and "AWS_ACCESS_KEY_ID" in err


def test_dry_run_writes_nothing_and_settings_change_is_refused(tmp_path, capsys):
    plain_corpus(tmp_path / "in", 4, size=(100, 80))
    assert shard(tmp_path / "in", "--output", tmp_path / "o", "--dry-run") == 0
    assert "would write 1 shards (4 inputs)" in capsys.readouterr().out
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert shard(tmp_path / "in", "--output", tmp_path / "o") == 0
    with pytest.raises(SystemExit):
        shard(tmp_path / "in", "--output", tmp_path / "o", "--quality", "70")
    assert "different settings" in capsys.readouterr().err


def test_csv_list_with_file_urls_and_size_limit(tmp_path):
    plain_corpus(tmp_path / "img", 3, size=(200, 150), classes=1)
    files = sorted((tmp_path / "img").rglob("*.jpg"))
    big = tmp_path / "big.png"
    big.write_bytes(encode(photo(600, 600, 1), "PNG"))
    lines = ["path,label,license"] + [f"file://{f},{i},cc-by" for i, f in enumerate(files)] + [f"{big},7,cc0"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    assert shard(tmp_path / "list.csv", "--output", tmp_path / "out", "--max-bytes", "200KB", "--workers", 1) == 0
    m = manifest_of(tmp_path / "out")
    assert m["rejections"]["file_too_large"]["count"] == 1 and m["totals"]["written"] == 3
    assert m["classes"] == {"0": 0, "1": 1, "2": 2, "7": 7}  # integer labels keep their values
    metas = [json.loads(s["json"]) for s in read_samples(str(tmp_path / "out")).values()]
    assert {m_["license"] for m_ in metas} == {"cc-by"}


def test_published_files_are_written_fsynced_and_renamed(tmp_path, monkeypatch):
    """config.yaml, shard tars, stats, manifests: each appears by a rename after its data was flushed,
    and the rename itself is flushed (a crash leaves the old file or the new one, never a torn one)."""
    import os

    from xtra_ds import storage
    from xtra_ds.config import load_config, save_config

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(storage.os, "fsync", fsync)  # the one module that puts files in place
    monkeypatch.setattr(storage.os, "replace", replace)

    def published(dest):
        """The tmp file was fsynced, then renamed to dest, then dest's folder fsynced."""
        i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(dest))
        tmp = events[i][1]
        assert ("fsync", tmp) in events[:i], f"{dest}: renamed without flushing its data"
        assert ("fsync", str(dest.parent)) in events[i + 1:], f"{dest}: the rename was not flushed"

    save_config(load_config(None, []), tmp_path / "run/config.yaml")
    published(tmp_path / "run/config.yaml")
    plain_corpus(tmp_path / "in", 3, size=(100, 80))
    assert shard(tmp_path / "in", "--output", tmp_path / "out", "--workers", 1) == 0
    for name in ("shard-000000.tar", "shard-000000.stats.json", "manifest.json"):
        published(tmp_path / "out" / name)


def test_verify_hashes_the_padding_after_the_tar_end(tmp_path):
    """A shard with bytes after its end-of-archive marker (tar writers pad to whole records) verifies
    when the manifest's size and sha256 are the whole file's: the padding goes through the hash too."""
    import hashlib

    plain_corpus(tmp_path / "in", 12, size=(640, 480), classes=1)  # a shard of several MB: > one read buffer
    assert shard(tmp_path / "in", "--output", tmp_path / "out", "--workers", 1, "--max-side", 0) == 0
    tar = tmp_path / "out/shard-000000.tar"
    with open(tar, "ab") as f:
        f.write(b"\0" * (3 << 20))
    m = manifest_of(tmp_path / "out")
    data = tar.read_bytes()
    assert len(data) > 3 << 20
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "out/manifest.json").write_text(json.dumps(m))
    assert verify_tool.main(["--output", str(tmp_path / "out")]) == 0


def test_a_server_that_refuses_an_input_rejects_it_and_the_shard_completes(tmp_path):
    """403 and 500 on every try: the input is rejected as unreadable (status and URL recorded), like a
    404, and the shard completes — before, the shard failed on every rerun and could never finalize."""
    server = LoopbackServer({"/ok.jpg": (200, encode(photo(200, 150, 1), "JPEG")), "/forbidden.jpg": (403, b"no"),
                             "/broken.jpg": (500, b"oops")})
    try:
        rows = [{"url": f"{server.url}/{name}"} for name in ("ok.jpg", "forbidden.jpg", "broken.jpg", "missing.jpg")]
        (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        assert shard(tmp_path / "list.jsonl", "--output", tmp_path / "out", "--workers", 1,
                     "--allow-sources", server.url) == 0
    finally:
        server.close()
    m = manifest_of(tmp_path / "out")
    assert m["totals"]["written"] == 1 and m["totals"]["rejected"] == 3
    details = {ex["source"].rsplit("/", 1)[-1]: ex["detail"] for ex in m["rejections"]["unreadable"]["examples"]}
    assert set(details) == {"forbidden.jpg", "broken.jpg"}
    assert "HTTP 403" in details["forbidden.jpg"] and "HTTP 500" in details["broken.jpg"]
    assert m["rejections"]["read_error"]["count"] == 1


def test_list_entries_reach_only_what_is_allowed(tmp_path, capsys):
    """A list reaches its own scheme by default: file:// secrets named in an s3-style list, or a cloud
    metadata address, are never read, and a rejected input never has its bytes recorded."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRETVALUE")
    page = tmp_path / "page.jpg"
    page.write_bytes(b"<html>TOPSECRETPAGE</html>")
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(photo(200, 150, 2), "JPEG"))
    rows = [{"url": f"https://example.org/{i}.jpg"} for i in range(2)] + [
        {"url": "http://169.254.169.254/latest/meta-data/iam/credentials"}, {"url": str(good)}, {"url": str(page)}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert shard(tmp_path / "list.jsonl", "--output", tmp_path / "out", "--workers", 1) == 0
    m = manifest_of(tmp_path / "out")
    assert m["totals"]["written"] == 1
    assert m["rejections"]["not_allowed"]["count"] == 3  # 2 × https and the metadata address: never fetched
    assert "--allow-sources https" in m["rejections"]["not_allowed"]["examples"][0]["detail"]
    assert "not_allowed" in capsys.readouterr().err
    text = (tmp_path / "out/manifest.json").read_text()
    assert "TOPSECRETPAGE" not in text and m["rejections"]["not_an_image"]["count"] == 1
    # an s3 list may not name local files
    from data_prep.sources import SourcePolicy
    policy = SourcePolicy()
    assert policy.refusal(str(secret), "s3://bucket/list.jsonl").startswith("file:// is not allowed")
    assert policy.refusal(f"file://{secret}", "s3://bucket/list.jsonl")
    assert policy.refusal("s3://bucket/a.jpg", "s3://bucket/list.jsonl") == ""
    assert SourcePolicy(("https://169.254.169.254",)).refusal("https://169.254.169.254/x", "/l.jsonl") == ""
    assert SourcePolicy(("https",)).refusal("https://[fe80::1]/x", "/l.jsonl")  # link-local: by name only


def test_pils_guard_is_kept_outside_the_prep_tools_own_check(monkeypatch):
    """data_prep checks pixel counts itself and lifts PIL's bomb guard only while it opens an image: the
    rest of the process (a loader, a probe) keeps PIL's guard."""
    import io as _io

    from PIL import Image

    from data_prep.imaging import Settings, process
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0  # importing data_prep left it alone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard, made small for the test
    raw = encode(photo(200, 150, 3), "JPEG")
    assert process(raw, Settings(max_pixels=1_000_000)).reason is None  # our limit governs inside the tool
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(_io.BytesIO(raw))  # and PIL's outside it
    assert process(raw, Settings(max_pixels=10_000)).reason == "too_many_pixels"


def test_the_earliest_input_of_identical_bytes_is_kept_whatever_the_shard_order(tmp_path):
    """Shards hold a shuffle of the inputs, yet of two inputs with the same bytes the one earlier in the
    sorted input list (the smaller key) is always the one kept: in one shard when the shuffle puts the later
    copy first, in one shard when it does not, and across shards."""
    from data_prep.manifest import input_order

    plain_corpus(tmp_path / "in", 12, size=(100, 80))
    original = tmp_path / "in/class0/img0000.jpg"
    (tmp_path / "in/class1/zz_copy.jpg").write_bytes(original.read_bytes())
    sources = sorted(str(p) for p in (tmp_path / "in").rglob("*.jpg"))
    first, copy = sources.index(str(original)), sources.index(str(tmp_path / "in/class1/zz_copy.jpg"))
    position = {seed: input_order(len(sources), seed).tolist() for seed in range(20)}
    copy_first = next(s for s in range(20) if position[s].index(copy) < position[s].index(first))
    copy_later = next(s for s in range(20) if position[s].index(copy) > position[s].index(first))
    for seed, per_shard in ((copy_first, 100), (copy_later, 100), (copy_first, 3)):
        out = tmp_path / f"out_{seed}_{per_shard}"
        assert shard(tmp_path / "in", "--output", out, "--workers", 1, "--shuffle-seed", seed,
                     "--shard-samples", per_shard) == 0
        m = manifest_of(out)
        assert m["totals"]["written"] == 12 and m["rejections"]["duplicate"]["count"] == 1
        assert m["rejections"]["duplicate"]["examples"] == [{"source": sources[copy],
                                                             "detail": f"same bytes as {sources[first]}"}]
        kept = {json.loads(s["json"])["source"] for s in read_samples(str(out)).values()}
        assert str(original) in kept and sources[copy] not in kept
        assert verify_tool.main(["--output", str(out), "--decode", "all"]) == 0
