"""Store layer: where bytes go (local disk, object storage, icechunk)."""
