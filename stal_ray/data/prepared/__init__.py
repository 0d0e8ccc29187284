"""The prepared format: a release written once as Parquet shards with a manifest, published by version."""
