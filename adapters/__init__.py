"""Adapters that plug the normstats core into NumPy and PyTorch models (``normstats.adapters``)."""
