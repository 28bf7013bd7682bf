"""Hypothesis entry point (``[project.entry-points.hypothesis]``): importing
``vmsim.strategies`` registers its types for ``st.from_type``.

Hypothesis calls :func:`setup` while it is itself being imported. The registration lives
at the bottom of ``vmsim.strategies`` rather than here, so that it also
happens when a user imports that module first (then this hook sees it half-imported, and
must not touch its attributes).
"""

import importlib


def setup() -> None:
    """Import ``vmsim.strategies``, which registers its type strategies."""
    importlib.import_module("vmsim.strategies")
