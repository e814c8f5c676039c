"""Tests of the NumPy adapter (``normstats.adapters.numpy``)."""
