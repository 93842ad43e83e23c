"""The parquet lake: storage through fsspec, the partition layout, parquet encoding and manifests."""
