"""Corpus-scale scoring: sharded, resumable score tables."""
