"""Test suite of normstats; mirrors the package layout."""
