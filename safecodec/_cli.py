"""The ``safecodec`` command line: inspect, verify, align, diff, convert, bench.

Every subcommand works on a *checkpoint*: one safetensors file (local path or fsspec URL),
a Hugging Face sharded checkpoint (a ``*.safetensors.index.json`` path), or a directory
holding exactly one of those. Tensors are streamed one at a time from memory-mapped
handles, so rewriting or comparing a checkpoint never holds it in memory beyond the pages
the kernel maps in.

Exit codes: 0 success; 1 a file is invalid, an operation failed, or (``diff --exit-code``)
the checkpoints differ; 2 a usage error (bad option, bad combination of arguments).

Example::

    $ safecodec inspect model.safetensors
    $ safecodec verify a.safetensors b.safetensors
    $ safecodec align reference.safetensors aligned.safetensors
    $ safecodec convert model.safetensors model-bf16.safetensors --dtype bfloat16
    $ safecodec diff model.safetensors model-bf16.safetensors
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import posixpath
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import numpy as np

from ._dtypes import DTYPES, DType, code_for_numpy
from ._errors import DtypeError, SafecodecError
from ._header import Header, TensorInfo
from ._reader import SafeOpen, read_header, safe_open
from ._source import is_remote, open_source
from ._version import __version__
from ._writer import AtomicFile, save_file

__all__ = ["build_parser", "main"]

#: A tensor is "aligned" when its absolute file offset is a multiple of this: the
#: condition under which ``jax.device_put`` on CPU aliases a mapped array (FORMAT.md).
ZERO_COPY_ALIGNMENT: Final = 64
#: Suffix of a Hugging Face sharded checkpoint index.
INDEX_SUFFIX: Final = ".index.json"
#: Elements compared per step by ``diff``: bounds the temporary float64 copies (16 MiB).
DIFF_CHUNK: Final = 1 << 21
#: Bytes touched per step by ``verify`` when it reads tensor data.
VERIFY_CHUNK: Final = 1 << 24
#: Floating-point codes: the ones ``convert`` casts and accepts as targets.
FLOAT_CODES: Final = frozenset(
    {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
     "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2"}
)  # fmt: skip


class UsageError(Exception):
    """Arguments that parse but make no sense together (exit status 2)."""


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Part:
    """One safetensors file of a checkpoint.

    Attributes:
        source: Path or URL of the file.
        shard: The file name as the index spells it (None for a single-file checkpoint).
        names: Tensors the index assigns to this file, in index order (None: all of them).
    """

    source: str
    shard: str | None = None
    names: list[str] | None = None


@dataclass
class Checkpoint:
    """A single file or a sharded checkpoint, resolved but not opened.

    Attributes:
        source: What the user named.
        parts: The safetensors files, in shard order.
        index: The parsed index JSON for a sharded checkpoint, else None.
    """

    source: str
    parts: list[Part]
    index: dict[str, Any] | None = None

    @property
    def sharded(self) -> bool:
        return self.index is not None


def _join(base: str, name: str) -> str:
    """The path of ``name`` next to the file ``base`` (local path or URL)."""
    if is_remote(base):
        return posixpath.join(posixpath.dirname(base), name)
    return os.path.join(os.path.dirname(base), name)


def _read_index(source: str) -> dict[str, Any]:
    """Read and check a sharded-checkpoint index: ``{"metadata": {...}, "weight_map":
    {tensor: shard file}}``."""
    src = open_source(source)
    try:
        raw = bytes(src.read(0, src.size, "index"))
    finally:
        src.close()
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafecodecError(f"index {source}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise SafecodecError(
            f"index {source}: expected an object with a \"weight_map\" object, got "
            f"{type(index).__name__} with keys {sorted(index)[:5] if isinstance(index, dict) else []}"
        )
    for name, shard in index["weight_map"].items():
        if not isinstance(shard, str) or not shard:
            raise SafecodecError(
                f"index {source}: tensor {name!r} maps to {shard!r}, expected a shard file name"
            )
        parts = shard.replace("\\", "/").split("/")
        # An index downloaded from the internet must not point outside its directory.
        if shard.startswith(("/", "\\")) or ".." in parts or is_remote(shard):
            raise SafecodecError(
                f"index {source}: tensor {name!r} maps to {shard!r}; shard names must be "
                "relative paths inside the index's directory"
            )
    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise SafecodecError(f"index {source}: \"metadata\" must be an object, got {metadata!r:.60}")
    return index


def resolve(source: str) -> Checkpoint:
    """Turn a path, URL, index path or directory into a :class:`Checkpoint`.

    Raises:
        SafecodecError: A malformed index, or a directory without exactly one checkpoint.
        FileNotFoundError: ``source`` does not exist.
    """
    if not is_remote(source) and os.path.isdir(source):
        entries = sorted(os.listdir(source))
        indexes = [e for e in entries if e.endswith(".safetensors" + INDEX_SUFFIX)]
        files = [e for e in entries if e.endswith(".safetensors")]
        if len(indexes) == 1:
            return resolve(os.path.join(source, indexes[0]))
        if not indexes and len(files) == 1:
            return Checkpoint(source, [Part(os.path.join(source, files[0]))])
        raise SafecodecError(
            f"directory {source} holds {len(indexes)} index files and {len(files)} "
            ".safetensors files; name the file or the index to use"
        )
    if source.endswith(INDEX_SUFFIX):
        index = _read_index(source)
        grouped: dict[str, list[str]] = {}
        for name, shard in index["weight_map"].items():
            grouped.setdefault(shard, []).append(name)
        parts = [Part(_join(source, shard), shard, names) for shard, names in sorted(grouped.items())]
        return Checkpoint(source, parts, index)
    return Checkpoint(source, [Part(source)])


def _part_infos(part: Part, header: Header) -> list[TensorInfo]:
    """The tensors of ``part`` that belong to the checkpoint, in file order."""
    if part.names is None:
        return list(header.tensors.values())
    missing = [n for n in part.names if n not in header.tensors]
    if missing:
        raise SafecodecError(
            f"the index assigns {len(missing)} tensor(s) to shard {part.shard!r} that it does "
            f"not contain, e.g. {missing[0]!r} (the shard has {len(header.tensors)} tensors)"
        )
    wanted = set(part.names)
    return [info for name, info in header.tensors.items() if name in wanted]


class OpenCheckpoint:
    """Every part of a checkpoint opened with :func:`safecodec.safe_open`, looked up by
    tensor name. A context manager; closing it closes every handle."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.handles: list[SafeOpen] = []
        self.where: dict[str, tuple[SafeOpen, TensorInfo]] = {}
        try:
            for part in ckpt.parts:
                handle = safe_open(part.source)
                self.handles.append(handle)
                for info in _part_infos(part, handle.header):
                    if info.name in self.where:
                        raise SafecodecError(f"tensor {info.name!r} appears in two shards")
                    self.where[info.name] = (handle, info)
        except BaseException:
            self.close()
            raise

    def metadata(self) -> dict[str, str] | None:
        """The user metadata: the file's, or the first shard's for a sharded checkpoint."""
        return self.handles[0].metadata() if self.handles else None

    def get(self, name: str) -> np.ndarray:
        handle, _ = self.where[name]
        return handle.get_tensor(name)  # type: ignore[no-any-return]

    def close(self) -> None:
        for handle in self.handles:
            handle.close()

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- output helpers


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def _table(rows: list[list[str]], right: set[int], out: IO[str]) -> None:
    """Print rows as aligned columns; the first row is the heading."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


class _Progress:
    """A tqdm bar on an interactive stderr when tqdm is installed, otherwise nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total > 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- inspect


def _inspect_data(ckpt: Checkpoint) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    shard_metadata: dict[str, dict[str, str] | None] = {}
    first_metadata: dict[str, str] | None = None
    for k, part in enumerate(ckpt.parts):
        header = read_header(part.source)
        if k == 0:
            first_metadata = header.raw_metadata
        files.append({"path": part.source, "header_size": header.header_size,
                      "data_start": header.data_start, "file_size": header.file_size})
        if part.shard is not None:
            shard_metadata[part.shard] = header.raw_metadata
        for info in _part_infos(part, header):
            offset = header.data_start + info.begin
            row: dict[str, Any] = {
                "name": info.name, "dtype": info.dtype.code, "shape": list(info.shape),
                "parameters": info.count, "bytes": info.nbytes, "offset": offset,
                "data_offsets": [info.begin, info.end],
                "aligned": offset % ZERO_COPY_ALIGNMENT == 0,
            }
            if part.shard is not None:
                row["shard"] = part.shard
            tensors.append(row)
    by_dtype: dict[str, int] = {}
    for t in tensors:
        by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + t["bytes"]
    out: dict[str, Any] = {
        "source": ckpt.source,
        "sharded": ckpt.sharded,
        "files": files,
        "metadata": (ckpt.index or {}).get("metadata") if ckpt.sharded else first_metadata,
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "parameters": sum(t["parameters"] for t in tensors),
            "bytes": sum(t["bytes"] for t in tensors),
            "bytes_by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: DTYPES[kv[0]].rank)),
            "aligned": sum(1 for t in tensors if t["aligned"]),
        },
    }
    if ckpt.sharded:
        out["shard_metadata"] = shard_metadata
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    data = _inspect_data(resolve(args.source))
    out = sys.stdout
    if args.json:
        json.dump(data, out, indent=2, ensure_ascii=False)
        print(file=out)
        return 0
    tensors = data["tensors"]
    if args.sort == "name":
        tensors = sorted(tensors, key=lambda t: t["name"])
    elif args.sort == "size":
        tensors = sorted(tensors, key=lambda t: -t["bytes"])
    sharded = data["sharded"]
    for f in data["files"]:
        start_ok = "yes" if f["data_start"] % ZERO_COPY_ALIGNMENT == 0 else "no"
        print(f"{f['path']}: {human_bytes(f['file_size'])}, header {f['header_size']:,} bytes, "
              f"data starts at byte {f['data_start']:,} (64-aligned: {start_ok})", file=out)
    print(file=out)
    heading = ["name", "dtype", "shape", "bytes", "offset", "64-aligned"] + (["shard"] if sharded else [])
    rows = [heading]
    for t in tensors:
        row = [t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]",
               f"{t['bytes']:,}", f"{t['offset']:,}", "yes" if t["aligned"] else "no"]
        rows.append(row + ([t["shard"]] if sharded else []))
    if tensors:
        _table(rows, {3, 4}, out)
    else:
        print("(no tensors)", file=out)
    totals = data["totals"]
    print(file=out)
    print(f"tensors:    {totals['tensors']:,} ({totals['aligned']:,} 64-byte aligned)", file=out)
    print(f"parameters: {totals['parameters']:,}", file=out)
    print(f"bytes:      {totals['bytes']:,} ({human_bytes(totals['bytes'])})", file=out)
    for code, n in totals["bytes_by_dtype"].items():
        print(f"  {code:<12}{n:,} ({human_bytes(n)})", file=out)
    md = data["metadata"]
    print("metadata:" + (" (none)" if not md else ""), file=out)
    for key, value in (md or {}).items():
        print(f"  {key}: {value}", file=out)
    return 0


# ----------------------------------------------------------------------------- verify


def _integrity() -> Any:
    """The checksum layer (:mod:`safecodec._integrity`), or None where it does not exist."""
    try:
        return importlib.import_module("._integrity", __package__)
    except ImportError:
        return None


def _stored_checksums(metadata: Mapping[str, str] | None) -> bool:
    module = _integrity()
    return module is not None and module.decode(metadata) is not None


def _check_checksums(part: Part) -> bool:
    """Verify stored per-tensor checksums; return whether the file had any.

    Raises:
        SafecodecError: (a ``ChecksumError``) listing every tensor whose bytes do not match.
    """
    module = _integrity()
    if module is None or module.decode(read_header(part.source).raw_metadata) is None:
        return False
    problems = module.verify_file(part.source)
    if problems:
        raise module.ChecksumError("; ".join(problems))
    return True


def _touch(arr: np.ndarray) -> None:
    """Read every byte of an array (pages come in from disk; I/O errors surface here)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, VERIFY_CHUNK):
        np.count_nonzero(flat[start : start + VERIFY_CHUNK])


def _count_nonfinite(arr: np.ndarray) -> int:
    """NaN and infinite elements, in chunks. ml_dtypes floats (bfloat16, float8...) have no
    NumPy ufunc loops of their own, so they are widened to float32 first."""
    flat = arr.reshape(-1)
    widen = arr.dtype.kind != "f"
    bad = 0
    for start in range(0, flat.size, DIFF_CHUNK):
        chunk = flat[start : start + DIFF_CHUNK]
        if widen:
            chunk = chunk.astype(np.float32)
        bad += chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
    return bad


def _verify_part(part: Part, finite: bool, progress: _Progress) -> tuple[int, int, bool]:
    """Strictly read one file; return (tensors, bytes, whether checksums were verified).
    Raises on the first failed check."""
    with safe_open(part.source) as f:
        infos = _part_infos(part, f.header)
        for info in infos:
            arr = f.get_tensor(info.name)
            _touch(arr)
            if finite and info.dtype.code in FLOAT_CODES and arr.size:
                bad = _count_nonfinite(arr)
                if bad:
                    raise SafecodecError(
                        f"tensor {info.name!r}: {bad} of {arr.size} elements are NaN or infinite"
                    )
            progress.update(info.nbytes)
    checked = _check_checksums(part)
    return len(infos), sum(i.nbytes for i in infos), checked


def cmd_verify(args: argparse.Namespace) -> int:
    failed = 0
    for source in args.files:
        try:
            ckpt = resolve(source)
            total_t = total_b = 0
            with_sums = 0
            # Header sizes first, so the progress bar knows the total.
            sizes = sum(read_header(p.source).file_size for p in ckpt.parts) if sys.stderr.isatty() else 0
            with _Progress(sizes, f"verify {os.path.basename(source)}", not args.quiet) as bar:
                for part in ckpt.parts:
                    try:
                        n, b, checked = _verify_part(part, args.finite, bar)
                    except SafecodecError as exc:
                        where = f" (shard {part.shard})" if part.shard else ""
                        raise type(exc)(f"{exc}{where}") from exc
                    total_t += n
                    total_b += b
                    with_sums += checked
            if ckpt.index is not None:
                declared = (ckpt.index.get("metadata") or {}).get("total_size")
                if declared is not None and declared != total_b:
                    print(f"note: {source}: index metadata.total_size is {declared}, the shards "
                          f"hold {total_b} bytes of tensors", file=sys.stderr)
        except (SafecodecError, OSError) as exc:
            failed += 1
            print(f"FAIL {source}: {type(exc).__name__}: {exc}")
            continue
        if not args.quiet:
            shards = f" in {len(ckpt.parts)} shards" if ckpt.sharded else ""
            sums = ("checksums verified" if with_sums == len(ckpt.parts) else
                    f"checksums verified in {with_sums} of {len(ckpt.parts)} files" if with_sums else
                    "no checksums stored")
            print(f"OK   {source}: {total_t} tensors, {total_b:,} bytes{shards}, {sums}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- align / convert


class LazyTensor:
    """A tensor the writer reads when it reaches it: dtype and shape come from the header,
    the data from the handle (a view of the mapping), cast on the fly if asked.

    :func:`safecodec.save_file` plans the file from ``dtype`` and ``shape`` alone and calls
    ``numpy.asarray`` on one tensor at a time while writing, so at most one (cast) tensor is
    in memory at once.
    """

    def __init__(self, handle: SafeOpen, info: TensorInfo, target: DType | None,
                 progress: _Progress) -> None:
        self._handle = handle
        self._info = info
        self._target = target
        self._progress = progress
        self.shape = info.shape
        self.dtype = (target or info.dtype).numpy

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr: np.ndarray = self._handle.get_tensor(self._info.name)
        if self._target is not None:
            arr = _cast(arr, self._target, self._info.name)
        self._progress.update(self._info.nbytes)
        return arr if dtype is None else arr.astype(dtype)


def _cast(arr: np.ndarray, target: DType, name: str) -> np.ndarray:
    try:
        return arr.astype(target.numpy)
    except (TypeError, ValueError):
        # Some ml_dtypes pairs have no direct cast; float32 holds every source value.
        try:
            return arr.astype(np.float32).astype(target.numpy)
        except (TypeError, ValueError) as exc:
            raise DtypeError(f"tensor {name!r}: cannot cast {arr.dtype} to {target.code}: {exc}") from exc


def parse_dtype(text: str) -> DType:
    """A floating safetensors dtype from a code (``BF16``) or a NumPy/ml_dtypes name
    (``bfloat16``, ``float16``, ``float8_e4m3fn``)."""
    if text in DTYPES:
        row = DTYPES[text]
    else:
        try:
            dt = np.dtype(text)
        except TypeError:
            import ml_dtypes

            attr = getattr(ml_dtypes, text, None)
            if attr is None:
                raise UsageError(f"unknown dtype {text!r}; use a code such as BF16 or a name "
                                 "such as bfloat16") from None
            dt = np.dtype(attr)
        try:
            row = DTYPES[code_for_numpy(dt, "--dtype")]
        except DtypeError:
            raise UsageError(f"--dtype {text!r} has no safetensors code; use a floating type "
                             "such as bfloat16, float16 or float32") from None
    if row.code not in FLOAT_CODES:
        raise UsageError(f"--dtype must be a floating type, got {text!r} ({row.code}); "
                         f"choose one of {', '.join(sorted(FLOAT_CODES))}")
    return row


def _rewrite_part(part: Part, out_path: str, target: DType | None, only: list[str] | None,
                  alignment: int, progress: _Progress) -> tuple[int, int, int]:
    """Stream one file into ``out_path``; return (tensors, cast tensors, data bytes out)."""
    with safe_open(part.source) as f:
        lazy: dict[str, LazyTensor] = {}
        cast = 0
        for info in _part_infos(part, f.header):
            tgt = None
            if (target is not None and info.dtype.code in FLOAT_CODES and info.dtype != target
                    and (only is None or any(fnmatch.fnmatchcase(info.name, p) for p in only))):
                tgt = target
                cast += 1
            lazy[info.name] = LazyTensor(f, info, tgt, progress)
        metadata = f.header.raw_metadata  # keep safecodec's own keys (e.g. tree structure)
        extra: dict[str, Any] = {}
        if _stored_checksums(metadata):
            # Old digests would be wrong after a cast (and are rewritten anyway): drop them
            # and have the writer compute new ones while it streams.
            module = _integrity()
            metadata = {k: v for k, v in (metadata or {}).items() if k != module.CHECKSUM_KEY}
            extra["checksums"] = True
        save_file(lazy, out_path, metadata, alignment=alignment, **extra)
    out_bytes = sum(i.nbytes for i in read_header(out_path).tensors.values())
    return len(lazy), cast, out_bytes


def _rewrite(args: argparse.Namespace, target: DType | None, only: list[str] | None,
             alignment: int, verb: str) -> int:
    ckpt = resolve(args.input)
    out = args.output
    progress_total = sum(read_header(p.source).file_size for p in ckpt.parts) if sys.stderr.isatty() else 0
    if not ckpt.sharded:
        if out.endswith(INDEX_SUFFIX):
            raise UsageError(f"{args.input} is a single file; OUT must be a file, not an index")
        if os.path.isdir(out):
            out = os.path.join(out, os.path.basename(ckpt.parts[0].source))
        with _Progress(progress_total, verb, not args.quiet) as bar:
            n, cast, _ = _rewrite_part(ckpt.parts[0], out, target, only, alignment, bar)
        _report_rewrite(args, verb, out, n, cast)
        return 0
    assert ckpt.index is not None
    if os.path.isdir(out):
        out = os.path.join(out, os.path.basename(ckpt.source))
    if not out.endswith(INDEX_SUFFIX):
        raise UsageError(f"{args.input} is a sharded checkpoint; OUT must be an index path "
                         f"ending in {INDEX_SUFFIX!r} or an existing directory")
    if os.path.abspath(out) == os.path.abspath(ckpt.source):
        raise UsageError("OUT is the input index; write the sharded checkpoint elsewhere")
    total_n = total_cast = total_bytes = 0
    with _Progress(progress_total, verb, not args.quiet) as bar:
        for part in ckpt.parts:
            assert part.shard is not None
            target_path = _join(out, part.shard)
            os.makedirs(os.path.dirname(os.path.abspath(target_path)), exist_ok=True)
            n, cast, nbytes = _rewrite_part(part, target_path, target, only, alignment, bar)
            total_n += n
            total_cast += cast
            total_bytes += nbytes
    index = dict(ckpt.index)
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_bytes}
    f = AtomicFile(out)
    try:
        f.file.write((json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        f.commit()
    except BaseException:
        f.discard()
        raise
    _report_rewrite(args, verb, out, total_n, total_cast)
    return 0


def _report_rewrite(args: argparse.Namespace, verb: str, out: str, n: int, cast: int) -> None:
    if args.quiet:
        return
    aligned = total = 0
    for part in resolve(out).parts:
        header = read_header(part.source)
        for info in _part_infos(part, header):
            total += 1
            aligned += (header.data_start + info.begin) % ZERO_COPY_ALIGNMENT == 0
    cast_note = f", {cast} cast to {args.dtype}" if verb == "convert" else ""
    print(f"wrote {out}: {n} tensors{cast_note}; {aligned} of {total} are 64-byte aligned")


def cmd_align(args: argparse.Namespace) -> int:
    return _rewrite(args, None, None, ZERO_COPY_ALIGNMENT, "align")


def cmd_convert(args: argparse.Namespace) -> int:
    target = parse_dtype(args.dtype)
    return _rewrite(args, target, args.only, args.alignment, "convert")


# ----------------------------------------------------------------------------- diff


@dataclass
class TensorDiff:
    """How one tensor present in both checkpoints differs."""

    name: str
    dtype: tuple[str, str]
    shape: tuple[list[int], list[int]]
    max_abs_diff: float | None = None
    differing: int = 0
    count: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return (self.dtype[0] != self.dtype[1] or self.shape[0] != self.shape[1]
                or self.differing > 0)


def _wide(arr: np.ndarray) -> np.ndarray:
    """Values in a type where subtraction is exact enough to report: complex128 for
    complex, float64 for everything else (ints above 2**53 lose their last bits)."""
    return arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)


def compare_arrays(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[float, int]:
    """Max |a - b| and the number of elements farther apart than ``atol``, in chunks.

    NaN equals NaN here (same position in both), and equal infinities are equal.
    """
    fa = a.reshape(-1)
    fb = b.reshape(-1)
    worst = 0.0
    differing = 0
    for start in range(0, fa.size, DIFF_CHUNK):
        x = _wide(fa[start : start + DIFF_CHUNK])
        y = _wide(fb[start : start + DIFF_CHUNK])
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(same, 0.0, np.abs(x - y))
        # Any remaining NaN (NaN vs number, inf vs -inf) is an infinite difference.
        d = np.where(np.isnan(d), np.inf, d)
        if d.size:
            worst = max(worst, float(d.max()))
            differing += int(np.count_nonzero(d > atol))
    return worst, differing


def cmd_diff(args: argparse.Namespace) -> int:
    with OpenCheckpoint(resolve(args.a)) as a, OpenCheckpoint(resolve(args.b)) as b:
        names_a, names_b = set(a.where), set(b.where)
        removed = [n for n in a.where if n not in names_b]
        added = [n for n in b.where if n not in names_a]
        common = [n for n in a.where if n in names_b]
        diffs: list[TensorDiff] = []
        total = sum(a.where[n][1].nbytes for n in common)
        with _Progress(total if sys.stderr.isatty() else 0, "diff", not args.quiet) as bar:
            for name in common:
                ia, ib = a.where[name][1], b.where[name][1]
                d = TensorDiff(name, (ia.dtype.code, ib.dtype.code), (list(ia.shape), list(ib.shape)),
                               count=ia.count)
                if ia.shape == ib.shape:
                    d.max_abs_diff, d.differing = compare_arrays(a.get(name), b.get(name), args.atol)
                else:
                    d.notes.append("shapes differ: values not compared")
                bar.update(ia.nbytes)
                diffs.append(d)
        md_a, md_b = a.metadata() or {}, b.metadata() or {}
    md_changes = {k: [md_a.get(k), md_b.get(k)] for k in sorted(set(md_a) | set(md_b))
                  if md_a.get(k) != md_b.get(k)}
    changed = [d for d in diffs if d.changed]
    different = bool(added or removed or changed or md_changes)
    if args.json:
        json.dump({
            "a": args.a, "b": args.b, "identical": not different,
            "removed": removed, "added": added, "metadata": md_changes,
            "tensors": [{"name": d.name, "dtype": list(d.dtype), "shape": list(d.shape),
                         "max_abs_diff": d.max_abs_diff, "differing": d.differing,
                         "count": d.count, "changed": d.changed} for d in diffs],
        }, sys.stdout, indent=2, ensure_ascii=False, allow_nan=True)
        print()
    else:
        _print_diff(args, removed, added, diffs, md_changes, a_info=None)
    return 1 if (args.exit_code and different) else 0


def _print_diff(args: argparse.Namespace, removed: list[str], added: list[str],
                diffs: list[TensorDiff], md_changes: Mapping[str, list[str | None]],
                a_info: Any) -> None:
    out = sys.stdout
    print(f"--- {args.a}", file=out)
    print(f"+++ {args.b}", file=out)
    for name in removed:
        print(f"- {name}  (only in A)", file=out)
    for name in added:
        print(f"+ {name}  (only in B)", file=out)
    for key, (va, vb) in md_changes.items():
        print(f"~ metadata {key!r}: {va!r} -> {vb!r}", file=out)
    shown = diffs if args.all else [d for d in diffs if d.changed]
    if shown:
        rows = [["tensor", "dtype", "shape", "max |a-b|", "differing"]]
        for d in shown:
            dtype = d.dtype[0] if d.dtype[0] == d.dtype[1] else f"{d.dtype[0]} -> {d.dtype[1]}"
            sa, sb = (str(s) for s in d.shape)
            shape = sa if sa == sb else f"{sa} -> {sb}"
            mad = "-" if d.max_abs_diff is None else f"{d.max_abs_diff:.6g}"
            differing = "-" if d.max_abs_diff is None else f"{d.differing:,} of {d.count:,}"
            rows.append([d.name, dtype, shape, mad, differing])
        _table(rows, {3, 4}, out)
    changed = sum(1 for d in diffs if d.changed)
    print(f"{len(diffs)} tensors in both ({changed} differ), {len(removed)} only in A, "
          f"{len(added)} only in B, {len(md_changes)} metadata changes", file=out)


# ----------------------------------------------------------------------------- bench


def cmd_bench(argv: list[str]) -> int:
    """Forward to the benchmark main job, imported only now (it pulls in matplotlib...)."""
    try:
        module = importlib.import_module("._bench", __package__)
    except ImportError as exc:
        print(f"safecodec bench: the benchmark suite is not available ({exc}); install "
              "with `pip install \"safecodec[bench]\"`", file=sys.stderr)
        return 1
    return int(module.main(argv) or 0)


# ----------------------------------------------------------------------------- parser


_EPILOG = """\
A checkpoint is a .safetensors file (local path or fsspec URL such as s3://bucket/x.safetensors),
a Hugging Face sharded checkpoint (*.safetensors.index.json), or a directory holding one.

exit status: 0 success, 1 invalid file / failed operation / differences with diff --exit-code,
2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``safecodec`` command."""
    parser = argparse.ArgumentParser(
        prog="safecodec",
        description="Inspect, validate, realign, compare and convert safetensors checkpoints.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"safecodec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)

    p = add("inspect", "list tensors, offsets, alignment, totals and metadata (header only)",
            "Print every tensor's name, dtype, shape, byte size, absolute file offset and whether "
            "it starts 64-byte aligned (zero-copy on JAX's CPU backend), then totals and the "
            "metadata. Only the header is read, also for remote files.")
    p.add_argument("source", metavar="CHECKPOINT", help="file, URL, index or directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead")
    p.add_argument("--sort", choices=("offset", "name", "size"), default="offset",
                   help="table order (default: offset, i.e. file order)")
    p.set_defaults(func=cmd_inspect, parser=p)

    p = add("verify", "strictly validate files; exit 1 if any is invalid",
            "Validate each checkpoint: every header rule of the format, then every tensor's "
            "bytes are read. Prints OK or FAIL with the exact failing check for each. "
            "Checksums stored in the file are verified when safecodec supports them.")
    p.add_argument("files", metavar="CHECKPOINT", nargs="+", help="files, URLs, indexes or directories")
    p.add_argument("--finite", action="store_true", help="also fail on NaN or infinite values in floating tensors")
    p.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    p.set_defaults(func=cmd_verify, parser=p)

    p = add("align", "rewrite into the 64-byte zero-copy layout, streaming",
            "Rewrite a checkpoint into safecodec's zero-copy layout (data section at a multiple "
            "of 64; tensors whose size is a multiple of 64 bytes first, so each starts 64-byte "
            "aligned). Tensors and metadata are identical; the output stays a valid safetensors "
            "file for every reader. Streams tensor by tensor from a memory-mapped input and "
            "writes atomically, so OUT may be IN. For a sharded checkpoint, OUT is the new index "
            "path (or a directory) and each shard keeps its file name.")
    p.add_argument("input", metavar="IN", help="file, URL, index or directory")
    p.add_argument("output", metavar="OUT", help="output file (index path for sharded input)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_align, parser=p)

    p = add("diff", "compare two checkpoints tensor by tensor",
            "Report tensors only in A or only in B, dtype and shape changes, metadata changes, "
            "and for tensors of equal shape the maximum absolute difference and how many "
            "elements differ (NaN equals NaN). Tensors are streamed one at a time.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--atol", type=float, default=0.0, help="count elements as differing only above this (default 0)")
    p.add_argument("--all", action="store_true", help="list unchanged tensors too")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the checkpoints differ")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_diff, parser=p)

    p = add("convert", "cast floating tensors to another dtype, streaming",
            "Write a copy of a checkpoint with every floating-point tensor cast to --dtype "
            "(integer, bool and complex tensors are copied unchanged). One tensor is in memory "
            "at a time. Metadata is kept.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--dtype", required=True,
                   help="target: a code (BF16, F16, F32, F8_E4M3, ...) or a name (bfloat16, float16, ...)")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="cast only tensors whose name matches (repeatable)")
    p.add_argument("--alignment", type=int, choices=(8, 64), default=64,
                   help="64: zero-copy layout (default); 8: the reference writer's layout")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_convert, parser=p)

    add("bench", "run the benchmark main job (options: safecodec bench --help)",
        "Save and load a model-shaped checkpoint with safecodec and its peers and print a "
        "results table. All arguments are passed to the benchmark suite.")
    return parser


def _split_bench(argv: list[str]) -> list[str] | None:
    """Arguments after ``bench`` when ``bench`` is the subcommand (its options belong to the
    benchmark suite, which has its own parser)."""
    for i, arg in enumerate(argv):
        if arg == "bench":
            return argv[i + 1 :]
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safecodec`` command line and return its exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when a file is invalid or an operation fails, 2 on usage errors.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    bench_args = _split_bench(args_list)
    if bench_args is not None:
        return cmd_bench(bench_args)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    command = args.command
    try:
        return int(args.func(args))
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"safecodec {command}: error: {exc}", file=sys.stderr)
        return 2
    except (SafecodecError, OSError) as exc:
        print(f"safecodec {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"safecodec {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`safecodec inspect x | head`): stop quietly,
        # and point stdout at devnull so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
