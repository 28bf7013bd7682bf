"""Hypothesis entry point (``[project.entry-points.hypothesis]``): importing
``loader.strategies`` and ``vmsim.strategies`` registers their types for ``st.from_type``.

It lives in vmsim, the top layer, which may import both. Hypothesis calls :func:`setup` while
it is itself being imported. The registrations live at the bottom of the strategy modules
rather than here, so that they also happen when a user imports one of them first (then this
hook sees it half-imported, and must not touch its attributes).
"""

import importlib


def setup() -> None:
    """Import both strategy modules, which register their type strategies."""
    importlib.import_module("loader.strategies")
    importlib.import_module("vmsim.strategies")
