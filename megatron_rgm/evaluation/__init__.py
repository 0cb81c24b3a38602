"""Evaluation: metrics over sampled responses, their report (table, JSON, plot), ProcessBench step evaluation."""
