"""Tests of the adapters (``normstats.adapters``); mirrors ``adapters/``."""
