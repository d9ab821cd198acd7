"""Explicit-matrix verification of the CInC Flow paper (being written)."""
