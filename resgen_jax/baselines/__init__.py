"""Baselines trained and sampled on the same RVQ tokens as ResGen."""
