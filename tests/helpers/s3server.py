"""A real S3 endpoint on loopback (moto's server, as s3fs's own tests use)."""

from __future__ import annotations

import pytest

from xtra_ds.engine.dist import free_port


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials for the loopback server, a fresh bucket, and the fsspec options to reach it."""
    import uuid

    import boto3
    import fsspec

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    fsspec.config.conf.pop("s3", None)
    # s3fs instances are cached by their arguments, with the credentials they found when made:
    # one made by an earlier test (say, one without credentials) must not serve this one
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    options = {"endpoint_url": s3_server}
    yield {"endpoint": s3_server, "bucket": bucket, "options": options}
