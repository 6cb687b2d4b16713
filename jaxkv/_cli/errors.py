"""The demo's error type, below both `demo` and `demo_remote` so neither imports the other for it."""

from __future__ import annotations


class DemoError(Exception):
    """Bad demo input or a resource the demo cannot use: printed as one line by the CLI."""
