"""Evaluation pieces: the evaluator network, feature-space metrics, PNG grids."""
