"""Hand-made safetensors files for the conformance and hostile-input tests."""

from __future__ import annotations

import struct


def blob(header: str | bytes, data: bytes = b"") -> bytes:
    """The 8-byte little-endian length of ``header``, ``header``, then ``data``.

    A ``str`` header is encoded with ``surrogatepass``, so that lone surrogates keep their
    (invalid) UTF-8 form and invalid UTF-8 can be written on purpose; ``bytes`` are used
    as they are.
    """
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data
