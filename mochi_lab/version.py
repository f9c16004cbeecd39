"""The package version, in a leaf module: workers and provenance read it without importing the handle."""

__version__ = "0.1.0"
