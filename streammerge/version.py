"""The package version (one place; the journal records it)."""

__version__ = "0.1.0"
