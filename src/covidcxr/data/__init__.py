"""Data: read any image, database layouts, the manifest with duplicates and patient splits, the uint8 cache, ingest."""
