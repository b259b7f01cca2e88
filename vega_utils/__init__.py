"""Helpers for the VEGA reimplementation: config, anchors, checkpoints, reports, synthetic data."""
