"""Optional per-tensor checksums, stored in the file's metadata.

Written on request (``save_file(..., checksums=True)``), the checksums live in one
metadata entry under the reserved namespace::

    "safecodec.checksums": "{\\"algorithm\\":\\"sha256\\",\\"tensors\\":{\\"w\\":\\"<64 hex>\\"}}"

The value is a JSON string, so the file stays a plain, valid safetensors file for every
reader (metadata values are strings). SHA-256 is in every Python's ``hashlib`` and runs at
1-2 GB/s with the CPU's SHA extensions; it detects accidental corruption (a flipped bit, a
torn download) and, unlike a CRC, deliberate tampering of tensor data as long as the header
itself is trusted.

The writer streams: it writes the header with placeholder digests of the final length,
hashes each tensor while writing it, then rewrites the header in place (same length) before
the file is renamed into place (or, for sinks that cannot be rewritten, such as remote
objects, computed in a first pass). Readers verify with ``verify=True`` (``safe_open``,
``load_file``, ``load``) or ``safecodec verify FILE``. This module is the pure codec: no
I/O; ``verify_file`` is a router (:mod:`safecodec._api`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._errors import ChecksumError
from ._header import CHECKSUM_KEY

__all__ = ["ALGORITHM", "CHECKSUM_KEY", "ChecksumError", "decode", "digest_of", "encode"]

#: The hash used for new files.
ALGORITHM: Final = "sha256"
_HEX_LENGTH: Final = {"sha256": 64}
#: Hashing is done in pieces of this size so a mapped tensor is not faulted in at once.
HASH_CHUNK: Final = 16 << 20


def placeholder(names: list[str]) -> str:
    """The metadata value with all-zero digests (same length as the final value)."""
    return encode({name: "0" * _HEX_LENGTH[ALGORITHM] for name in names})


def encode(digests: Mapping[str, str]) -> str:
    """The metadata value for ``digests`` (name -> hex digest)."""
    import json  # imported on first use: only files with checksums pay for it

    return json.dumps({"algorithm": ALGORITHM, "tensors": dict(digests)},
                      ensure_ascii=False, separators=(",", ":"))


def decode(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """The stored digests (name -> hex), or None when the file has no checksums.

    Raises:
        ChecksumError: The entry exists but is not what safecodec writes.
    """
    if not metadata or CHECKSUM_KEY not in metadata:
        return None
    try:
        import json  # imported on first use: only files with checksums pay for it

        value = json.loads(metadata[CHECKSUM_KEY])
    except ValueError as exc:
        raise ChecksumError(f"metadata entry {CHECKSUM_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or value.get("algorithm") not in _HEX_LENGTH:
        raise ChecksumError(
            f"metadata entry {CHECKSUM_KEY!r} names an unsupported algorithm "
            f"{value.get('algorithm') if isinstance(value, dict) else value!r:.40}; "
            f"supported: {', '.join(_HEX_LENGTH)}"
        )
    tensors = value.get("tensors")
    width = _HEX_LENGTH[value["algorithm"]]
    if not isinstance(tensors, dict) or not all(
        isinstance(v, str) and len(v) == width for v in tensors.values()
    ):
        raise ChecksumError(f"metadata entry {CHECKSUM_KEY!r} has malformed digests")
    return tensors


def new_hasher() -> Any:
    """A fresh hash object of :data:`ALGORITHM`."""
    import hashlib  # imported on first use: it loads OpenSSL

    return hashlib.new(ALGORITHM)


def sha256_hex(data: Any) -> str:
    """The SHA-256 of a bytes-like object, in hex (shard identities in sharded indexes)."""
    import hashlib  # imported on first use: it loads OpenSSL

    return hashlib.sha256(data).hexdigest()


def digest_of(data: Any) -> str:
    """Hex digest of a bytes-like object, hashed in chunks."""
    view = memoryview(data).cast("B")
    h = new_hasher()
    for start in range(0, len(view), HASH_CHUNK):
        h.update(view[start : start + HASH_CHUNK])
    return str(h.hexdigest())


def check_pieces(name: str, pieces: Iterable[Any], digests: Mapping[str, str]) -> None:
    """:func:`check` for a tensor whose bytes arrive in ``pieces`` (in order): hashed as
    they come, never held whole."""
    expected = digests.get(name)
    if expected is None:
        raise ChecksumError(f"tensor {name!r} has no stored checksum ({CHECKSUM_KEY})")
    h = new_hasher()
    for piece in pieces:
        h.update(piece)
    _compare(name, expected, str(h.hexdigest()))


def check(name: str, data: Any, digests: Mapping[str, str]) -> None:
    """Raise :class:`ChecksumError` unless ``data`` hashes to the digest stored for ``name``."""
    expected = digests.get(name)
    if expected is None:
        raise ChecksumError(f"tensor {name!r} has no stored checksum ({CHECKSUM_KEY})")
    _compare(name, expected, digest_of(data))


def _compare(name: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for tensor {name!r}: stored {ALGORITHM} {expected}, "
            f"data hashes to {actual} (the tensor's bytes are corrupted)"
        )
