"""Object stores on loopback for the lake tests: moto's S3 server and gcp-storage-emulator.

Session fixtures (per xdist worker) start each server in a thread of the test process on
127.0.0.1 and a free port, create a bucket, and give the environment a `pcbo` subprocess needs to
reach it (`object_store_env`). Tests use `s3_store` / `gcs_store` (skipped when moto or
gcp-storage-emulator is not installed). Dummy credentials only: nothing here is a secret.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pcbo_dagster_tests.loopback import free_port

BUCKET = "pcbo-test-lake"


@dataclass
class ObjectStore:
    scheme: str  # "s3" or "gs"
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def url(self, prefix: str | None = None) -> str:
        """A fresh lake (or source) URL under the bucket; each call gives a new prefix."""
        return f"{self.scheme}://{self.bucket}/{prefix or uuid.uuid4().hex}"

    def filesystem(self) -> object:
        """An fsspec file system for this store, configured as `pcbo` configures it."""
        from pcbo_dagster.lake.storage import filesystem

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            fs, _ = filesystem(f"{self.scheme}://{self.bucket}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return fs


S3_ENV_BASE = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_store() -> Iterator[ObjectStore]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=BUCKET)
        yield ObjectStore("s3", BUCKET, {**S3_ENV_BASE, "PCBO_S3_ENDPOINT_URL": endpoint})
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_store() -> Iterator[ObjectStore]:
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        yield ObjectStore(
            "gs",
            BUCKET,
            {
                "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                # gcsfs's gRPC bucket-type probe stalls ~60 s per open against the emulator
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "pcbo-test",
            },
        )
    finally:
        server.stop()
