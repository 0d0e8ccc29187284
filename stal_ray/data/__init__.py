"""Data, in the order it flows: releases/ (each release read as shipped, checked, into typed tracklets) ->
prepared/ (the prepared format: Parquet shards, manifest, versions, integrity) -> stream/ (the Ray Data
training and evaluation streams). synthetic/ writes releases in the real layouts; source.py says which
prepared data set a job reads."""
