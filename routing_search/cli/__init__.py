"""Command-line entry points (``routing-search demo``, ``routing-search study``)."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
