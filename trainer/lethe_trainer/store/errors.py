"""Exceptions of the artifact store.

Every message names what failed, the key or URI involved, and what to do.
The subclasses let callers tell a corrupted object or a conflicting commit
from a configuration problem without parsing messages.
"""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store operation failed; the message names the key or URI and the fix."""


class ObjectMissingError(StoreError):
    """An object a record names is not in the store."""


class IntegrityError(StoreError):
    """Stored bytes do not match the size or sha256 a record names."""


class ConflictError(StoreError):
    """A write would replace a different record that is already there."""
