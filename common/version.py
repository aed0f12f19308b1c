"""The dpfed version, reported by agents at registration and written into model cards."""

__version__ = "0.1.0"
