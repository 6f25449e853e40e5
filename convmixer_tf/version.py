"""The package's version (read by setup.cfg, written into exported files' metadata)."""

__version__ = "0.1.0"
