"""Placeholder: this family is being written (see its issue)."""
