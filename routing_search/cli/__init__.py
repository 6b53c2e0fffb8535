"""Command-line entry points: ``routing-search demo``, ``study``, ``experiment``, ``tune`` and ``escape``."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
