"""Argument handling shared by the data_prep tools."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .storage import StorageError


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True,
                        help="destination: a local directory or a URL such as s3://bucket/prefix")
    parser.add_argument("--endpoint-url", default=os.environ.get("S3_ENDPOINT_URL"),
                        help="S3-compatible endpoint (MinIO, Ceph, …); default $S3_ENDPOINT_URL. Credentials come from "
                        "the environment or AWS profile and are never printed")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fsspec option (repeatable), e.g. anon=true or "
                             "client_kwargs={region_name: eu-west-1}")


def storage_options(args: argparse.Namespace) -> dict:
    opts = {}
    for item in args.storage_option:
        if "=" not in item:
            raise StorageError(f"--storage-option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        opts[k] = yaml.safe_load(v)
    if args.endpoint_url:
        opts["endpoint_url"] = args.endpoint_url
    return opts


def parse_size(text: str) -> int:
    """'256MB', '1.5GiB', '1000000' -> bytes."""
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
