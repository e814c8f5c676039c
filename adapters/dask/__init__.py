"""Statistics of Dask arrays, computed where their chunks are (``normstats.adapters.dask``).

Importing this module teaches the core to reduce Dask arrays on their cluster: every
estimator's ``update(x)`` and the Standardizer's ``fit`` / ``partial_fit`` then take a Dask
array as one batch (reduced in one pass, exactly, whatever its chunking; only per-feature
statistics reach the client), ``Moments.from_array`` too, and the Standardizer's
``transform`` returns a lazy Dask array. :func:`moments` gives the :class:`~normstats.Moments`
of a Dask array lazily, to compute together with other results. docs/dask.md shows a
cluster recipe and the measured figures.
"""

try:
    import dask.array  # noqa: F401  # the extra's dependency, named if missing
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"normstats.adapters.dask needs dask ({error}); run: pip install 'normstats[dask]'",
        name=error.name,
    ) from error

from normstats.deferred import register

from .reduction import DaskArrays, moments

register(DaskArrays())

__all__ = ["moments"]
