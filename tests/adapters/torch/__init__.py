"""Tests of the PyTorch adapter (``normstats.adapters.torch``)."""
