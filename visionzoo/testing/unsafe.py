"""A stand-in for a malicious checkpoint, for the tests that no file a user passes can run code."""
from __future__ import annotations

import os


class RunsCodeWhenUnpickled:
    """Pickles to ``os.system("touch MARKER")``: if a loader ever unpickles it, MARKER appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
