"""Sharded checkpoints, the pure part: the Hugging Face index format and shard planning.

A sharded checkpoint is a directory holding ``<prefix>-00001-of-0000N.safetensors`` shards
and ``<prefix>.safetensors.index.json``::

    {
      "metadata": {"total_size": <sum of tensor data bytes>},
      "weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}
    }

written with a 2-space indent, sorted keys and a trailing newline. ``weight_map`` decides
which shard a name comes from. This is a convention, not part of the format
(docs/format.md). No I/O here: reading and writing checkpoints is
:mod:`safecodec._sharded`'s job, finding them the resolver's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from ._errors import SafecodecError

__all__ = [
    "DEFAULT_PREFIX",
    "INDEX_SUFFIX",
    "MAX_INDEX_SIZE",
    "SHARD_PATTERN",
    "check_shard_name",
    "index_bytes",
    "parse_index",
    "parse_size",
    "pick_index",
    "plan_shards",
    "split_target",
]

#: Index files end with this (``model.safetensors.index.json``).
INDEX_SUFFIX: Final = ".safetensors.index.json"
#: Shard names: ``<prefix>-<i>-of-<n>.safetensors`` with five digits, like Hugging Face.
SHARD_PATTERN: Final = "{prefix}-{i:05d}-of-{n:05d}.safetensors"
#: Default prefix when saving into a directory.
DEFAULT_PREFIX: Final = "model"
#: Largest index file read (an index maps names to file names; 100 MB is already absurd).
MAX_INDEX_SIZE: Final = 100_000_000
#: Longest shard name accepted in an index (a relative path; HF's are ~40 characters).
MAX_SHARD_NAME: Final = 1024
#: Longest component of a shard name, in bytes (NAME_MAX of common filesystems).
MAX_NAME_COMPONENT: Final = 255

_UNITS: Final = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
#: A size such as "5GB" (compiled by ``re`` on first use, from its cache afterwards).
_SIZE_PATTERN: Final = r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$"


def parse_size(value: int | str) -> int:
    """A shard size limit in bytes: an int, or a string like ``"5GB"`` (10**9, the Hugging
    Face meaning), ``"500MiB"`` (2**20) or ``"1.5GB"``.

    Raises:
        SafecodecError: Not a positive size.

    Examples:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(value, bool):
        raise SafecodecError(f"max_shard_size must be an int or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.match(_SIZE_PATTERN, value)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise SafecodecError(
                f"max_shard_size {value!r} is not a size; use bytes (int) or e.g. '5GB', '500MB', "
                "'2GiB'"
            )
        size = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise SafecodecError(
            f"max_shard_size must be an int or a string like '5GB', got {type(value).__name__}"
        )
    if size <= 0:
        raise SafecodecError(f"max_shard_size must be positive, got {value!r}")
    return size


def pick_index(candidates: list[str], files: list[str], directory: str) -> tuple[str | None, str | None]:
    """Choose the index (or the lone safetensors file) among a directory's file names."""
    if len(candidates) == 1:
        return candidates[0], None
    if len(candidates) > 1:
        preferred = [c for c in candidates if c == "model" + INDEX_SUFFIX]
        if preferred:
            return preferred[0], None
        raise SafecodecError(
            f"directory {directory} holds {len(candidates)} index files "
            f"({', '.join(sorted(candidates))}); open one of them directly"
        )
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(singles) == 1:
        return None, singles[0]
    raise SafecodecError(
        f"directory {directory} holds no '*{INDEX_SUFFIX}' index and "
        f"{len(singles)} .safetensors files; open a file or an index instead"
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dupes: dict[str, list[Any]] = {}
    for key, value in pairs:
        # The same name mapped twice to the same shard is harmless; anything else is not.
        if key in out and (out[key] != value or not isinstance(value, str)):
            dupes.setdefault(key, [out[key]]).append(value)
        out[key] = value
    if dupes:
        key, values = next(iter(dupes.items()))
        raise _DuplicateKey(key, values, len(dupes))
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str, values: list[Any], count: int) -> None:
        super().__init__(key)
        self.key, self.values, self.count = key, values, count


def parse_index(data: bytes, name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate an index file's bytes; return ``(weight_map, metadata)``.

    Raises:
        SafecodecError: Not JSON, not the expected shape, a name mapped to two shards, or a
            shard name that leaves the index's directory.
    """
    try:
        import json  # imported on first use: only sharded checkpoints pay for it

        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as dup:
        if isinstance(dup.values[0], str):
            raise SafecodecError(
                f"index {name}: tensor {dup.key!r} is mapped to two shards "
                f"({', '.join(map(repr, dup.values))})"
                + (f", and {dup.count - 1} more names are duplicated" if dup.count > 1 else "")
            ) from None
        raise SafecodecError(f"index {name}: key {dup.key!r} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafecodecError(f"index {name} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise SafecodecError(
            f"index {name} must be a JSON object with a 'weight_map' object mapping tensor "
            "names to shard files"
        )
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise SafecodecError(f"index {name}: 'metadata' must be an object, got {type(metadata).__name__}")
    weight_map: dict[str, str] = obj["weight_map"]
    checked: set[str] = set()
    for tensor, shard in weight_map.items():
        if shard not in checked:
            check_shard_name(shard, tensor, name)
            checked.add(shard)
    return weight_map, metadata


def check_shard_name(shard: Any, tensor: str, index: str) -> None:
    """Raise :class:`~safecodec.SafecodecError` unless ``shard`` names a file inside the
    index's directory: a non-empty relative path of at most :data:`MAX_SHARD_NAME`
    characters, without a NUL or control character, ``..``, ``.``, empty or over-long
    components, a drive or a URL, and not ending in a separator (a directory)."""
    def bad(why: str) -> SafecodecError:
        return SafecodecError(
            f"index {index}: tensor {tensor!r} maps to {shard!r:.80}, which is not a file "
            f"inside the checkpoint's directory ({why})"
        )

    if not isinstance(shard, str) or not shard:
        raise SafecodecError(
            f"index {index}: tensor {tensor!r} maps to {shard!r:.80}, expected a shard file name"
        )
    if len(shard) > MAX_SHARD_NAME:
        raise bad(f"{len(shard)} characters, over {MAX_SHARD_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in shard):
        raise bad("a NUL or control character")
    parts = re.split(r"[/\\]", shard)
    if shard.startswith(("/", "\\")) or "://" in shard or ":" in parts[0]:
        raise bad("an absolute path, drive or URL")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("an empty, '.' or '..' path component, or a trailing separator")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_COMPONENT for p in parts):
        raise bad(f"a path component over {MAX_NAME_COMPONENT} bytes")


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in the order given, into shards of at most ``max_bytes`` tensor bytes;
    a tensor larger than the limit gets a shard of its own.

    Examples:
        >>> plan_shards([("a", 40), ("b", 40), ("c", 300), ("d", 10)], 100)
        [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if nbytes > max_bytes:
            if current:
                shards.append(current)
                current, used = [], 0
            shards.append([name])
            continue
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def split_target(target: str) -> tuple[str, str, str]:
    """``(directory, prefix, index file name)`` for a save target: a directory, an index
    path, or a ``.safetensors`` path whose stem becomes the prefix."""
    stripped = target.rstrip("/\\") or target
    base = stripped.replace("\\", "/").rsplit("/", 1)[-1]
    directory = stripped[: len(stripped) - len(base)]
    if not directory.endswith("://"):  # keep the "//" of a bare "memory://name"
        directory = directory[:-1] if directory.endswith(("/", "\\")) else directory
    if base.endswith(INDEX_SUFFIX):
        return directory, base[: -len(INDEX_SUFFIX)], base
    if base.endswith(".safetensors"):
        prefix = base[: -len(".safetensors")]
        return directory, prefix, prefix + INDEX_SUFFIX
    return stripped, DEFAULT_PREFIX, DEFAULT_PREFIX + INDEX_SUFFIX


def index_bytes(weight_map: Mapping[str, str], total_size: int,
                extra_metadata: Mapping[str, Any] | None = None) -> bytes:
    """The index file's bytes: 2-space indent, sorted keys, trailing newline."""
    metadata: dict[str, Any] = dict(extra_metadata or {})
    metadata["total_size"] = total_size
    obj = {"metadata": metadata, "weight_map": dict(weight_map)}
    import json  # imported on first use: only sharded checkpoints pay for it

    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
