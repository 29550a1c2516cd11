"""Error classes shared by the package. Every message is one line and names the fix."""
from __future__ import annotations


class DormantError(Exception):
    """Base class of all errors this package raises on purpose (the CLI prints them and exits 2)."""


class UnknownModelError(DormantError):
    """A model name that is neither a zoo name, an existing path, nor a hub id."""


class ChecksumError(DormantError):
    """An assembled file whose sha256 differs from the registry (the bad file is deleted)."""


class DownloadError(DormantError):
    """pip could not download a wheel (no network or no PyPI access), or pip is missing."""


class HubError(DormantError):
    """A hub id that cannot be loaded (hub unreachable, offline mode, or no such repository)."""


class InputError(DormantError, ValueError):
    """Input the package cannot use as given (empty, wrong dtype, out of range, unreadable file); also a
    ValueError, so callers catching ValueError keep working."""
