"""Tests of the comparison (``normstats.adapters.compare``, ``normstats compare``)."""
