"""The level-0 ingestion engine."""
