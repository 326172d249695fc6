"""Test plumbing: local storage that holds a save back until the test opens a gate."""

from __future__ import annotations

import threading

from unickpt.storage import LocalStorage


class GatedLocal(LocalStorage):
    """Local storage whose every listing waits for ``gate``: a background save's first storage
    call (the check of its target), so its copy has not started until the test says so."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()

    def list(self, prefix: str = "") -> list[str]:
        assert self.gate.wait(timeout=60), "gate never opened"
        return super().list(prefix)
