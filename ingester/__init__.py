"""artStore Ingester: the upload front door of artStore."""

__version__ = "0.1.0"
