"""The comparison: inference accuracy of BatchNorm networks under every statistics strategy.

``normstats compare`` (the console script, also ``python -m normstats compare``) and
:func:`compare` train networks through the NumPy and torch adapters and evaluate each
strategy on the same trained network. Its extra (scikit-learn, matplotlib, tqdm, mnist1d,
threadpoolctl: ``pip install 'normstats[compare]'``) is imported only when a comparison runs.
"""

from .cli import main
from .plots import plots_from_results
from .records import IncompleteError, Record
from .runner import compare

__all__ = ["IncompleteError", "Record", "compare", "main", "plots_from_results"]
