"""Evaluation: benchmark loaders (metrics and reports land here too)."""
