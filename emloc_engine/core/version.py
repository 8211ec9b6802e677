"""The one version number of EMLoC Studio (engine, CLI and app)."""

__version__ = "0.1.0"
