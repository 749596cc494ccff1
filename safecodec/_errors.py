"""The exception hierarchy of safecodec.

Every problem with the bytes of a file (or with tensors handed to a writer) is a
:class:`SafecodecError`, which is a :class:`ValueError`, so ``except ValueError`` keeps
working for code written against the reference wheel. Subclasses say which layer found the
problem; messages name the check, the tensor and the expected and actual numbers.
"""

# No ``from __future__ import annotations``: `import safecodec` loads this module and
# nothing else of ours, and that import would be a module of its own.

__all__ = [
    "ChecksumError",
    "ClosedHandleError",
    "DtypeError",
    "HeaderError",
    "OffsetError",
    "RemoteIOError",
    "SafecodecError",
    "SliceIndexError",
    "TensorNotFoundError",
    "TreeStructureError",
    "counted",
]


class SafecodecError(ValueError):
    """Base class of every error safecodec raises about data or arguments."""


class HeaderError(SafecodecError):
    """The 8-byte length prefix or the JSON header breaks a rule of the format."""


class OffsetError(SafecodecError):
    """Tensor offsets, shapes and dtypes do not describe the data section exactly."""


class DtypeError(SafecodecError):
    """A dtype code is unknown, or an array's dtype has no safetensors code, or a
    requested output cannot represent the dtype."""


class TreeStructureError(SafecodecError):
    """A tree does not match its template, or recorded structure is inconsistent."""


class RemoteIOError(SafecodecError, OSError):
    """Reading from or writing to a remote / file-like source failed, came back short, or
    the object changed since it was opened. Both a :class:`SafecodecError` and an
    ``OSError`` (code that handles I/O errors catches it); the filesystem's own exception
    is chained as ``__cause__``."""


class ChecksumError(SafecodecError):
    """A tensor's bytes do not match the checksum stored for it, or the stored checksums
    are malformed or absent when verification was asked for."""


class ClosedHandleError(SafecodecError):
    """A ``safe_open`` handle was used after it was closed."""


class TensorNotFoundError(SafecodecError, KeyError):
    """No tensor of that name exists. Also a :class:`KeyError`."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class SliceIndexError(SafecodecError, IndexError):
    """An index given to a slice is out of range or not a basic index. Also an
    :class:`IndexError`."""


def counted(n: int, noun: str) -> str:
    """``"1 tensor"``, ``"2 tensors"``: a count and its noun, for messages (a regular
    plural; every noun used with it takes an ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
