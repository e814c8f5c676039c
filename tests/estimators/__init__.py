"""Tests of the running-statistics strategies (``normstats.estimators``)."""
