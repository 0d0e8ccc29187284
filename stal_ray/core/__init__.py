"""The ground floor every layer uses: storage (fsspec, S3, atomic writes), the skeleton (joints, parts,
canonical pose, mirror map), preprocessing of frames into the backbone's input, progress lines and the run's
log. No Ray here; torch only in preprocess."""
