"""The Ray Data streams: P x K training batches of clips, and the evaluation chunks, from prepared shards."""
