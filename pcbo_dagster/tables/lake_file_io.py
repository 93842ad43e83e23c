"""The FileIO of the Iceberg tables pcbo opens (the catalogs' `py-io-impl`, `LAKE_FILE_IO`).

On an object store a table's metadata files, manifest lists, manifests and data files are reached as
the lake is, through its own file system (`storage.filesystem`: `PCBO_S3_ENDPOINT_URL`, else
`AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; the GCS emulator's settings). pyiceberg's own S3 and
GCS clients know none of these variables (only an `s3.endpoint` property), and ask AWS where a bucket
is when no `s3.region` is given: a lake on an S3-compatible server had its table sent to AWS's public
endpoint. A local lake is pyiceberg's PyArrow FileIO as it is. (Imported by pyiceberg only, by name.)
"""

from __future__ import annotations

from typing import Any

from pyarrow.fs import FSSpecHandler, PyFileSystem
from pyiceberg.io.pyarrow import PyArrowFileIO

from pcbo_dagster.lake.storage import filesystem

#: The object stores a lake may be on.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs")


class LakeFileIO(PyArrowFileIO):
    def _initialize_fs(self, scheme: str, netloc: str | None = None) -> Any:
        if scheme.lower() in OBJECT_STORE_SCHEMES:
            fs, _ = filesystem(f"{scheme}://{netloc or ''}")
            return PyFileSystem(FSSpecHandler(fs))
        return super()._initialize_fs(scheme, netloc)
