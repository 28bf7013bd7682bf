"""Root pytest configuration: pictures render off-screen, in tests and in notebook kernels
(nbmake starts each kernel as a child process, which inherits this environment)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
