"""Data: embedded sources (no downloads) and grain pipelines."""
