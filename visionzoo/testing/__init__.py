"""Test support shipped with the package: the data-driven parity runner against the official code."""
