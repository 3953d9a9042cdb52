"""Held-out evaluation: baselines, the checkpoint predictor, the in-loop evaluator, plots."""
