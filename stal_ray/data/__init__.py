"""Data: the MARS release reader (mars), the embedded synthetic release (synthetic), shards and pipelines."""
