"""Sizes shared by the detector, controller and scenario tests."""

# Small enough that a 150-step scenario trains in about a second on one CPU core.
MICRO = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, d_expert=64)
