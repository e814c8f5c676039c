"""Adapters that plug the normstats core into NumPy and PyTorch models (``normstats.adapters``)."""

if __name__ != "normstats.adapters":
    # adapters/ of the source tree is the package normstats.adapters. Imported as a top-level
    # `adapters` (python or pytest run in the repository root), every module in it would load a
    # second time, with classes distinct from normstats.adapters' own.
    raise ImportError(
        f"adapters/ is installed as normstats.adapters; import it by that name, not as {__name__!r}"
    )
