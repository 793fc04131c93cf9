"""artStore Ingester: the upload front door of artStore."""

import sys

__version__ = "0.1.0"

# httpx imports its command-line client (`httpx._main`) along with the library whenever
# click, rich and pygments are installed, as they are in a development environment
# (schemathesis brings rich): 3.3 MB of every process's resident memory for a terminal UI
# nothing here runs (measured: an idle `ingester serve` at 78.9 MB with them, 75.6 without).
# A module marked absent makes httpx take its own ImportError fallback. No effect when httpx
# was imported first, or when they are not installed (the container image).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
