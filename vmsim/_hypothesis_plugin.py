"""Hypothesis entry point (``[project.entry-points.hypothesis]``): importing the fuzz kit's
strategy modules (``vmsim.fuzz.images``, ``vmsim.fuzz.malformed``, ``vmsim.fuzz.ops``; public as
``loader.strategies`` and ``vmsim.strategies``) registers their types for ``st.from_type``.

Hypothesis calls :func:`setup` while it is itself being imported. The registrations live at the
bottom of the strategy modules rather than here, so that they also happen when a user imports
one of them first (then this hook sees it half-imported, and must not touch its attributes).
"""

import importlib


def setup() -> None:
    """Import the strategy modules, which register their type strategies."""
    for module in ("vmsim.fuzz.images", "vmsim.fuzz.malformed", "vmsim.fuzz.ops"):
        importlib.import_module(module)
