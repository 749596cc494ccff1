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
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import numpy as np

from . import _integrity
from ._api import safe_open, save_file, verify_handle
from ._dtypes import DTYPES, FLOAT_CODES, DType, dtype_from_text
from ._errors import ChecksumError, DtypeError, RemoteIOError, SafecodecError, counted
from ._header import CHECKSUM_KEY, ZERO_COPY_ALIGNMENT, TensorInfo
from ._progress import ProgressBar
from ._reader import SafeOpen
from ._resolve import Target, resolve_target
from ._sharded import ShardedSafeOpen, write_checkpoint
from ._shardindex import INDEX_SUFFIX
from ._version import __version__

__all__ = ["build_parser", "main"]

#: Elements compared per step by ``diff``: bounds the temporary float64 copies (16 MiB).
DIFF_CHUNK: Final = 1 << 21
#: Bytes touched per step by ``verify`` when it reads tensor data.
VERIFY_CHUNK: Final = 1 << 24


class UsageError(Exception):
    """Arguments that parse but make no sense together (exit status 2)."""


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Part:
    """One safetensors file of a checkpoint, opened.

    Attributes:
        source: Path or URL of the file (for messages).
        handle: Its open handle.
        shard: The file name as the index spells it (None for a single-file checkpoint).
        names: Tensors the index assigns to this file, in index order (None: all of them).
    """

    source: str
    handle: SafeOpen
    shard: str | None = None
    names: list[str] | None = None

    def infos(self) -> list[TensorInfo]:
        """The tensors of this part that belong to the checkpoint, in file order."""
        tensors = self.handle.header.tensors
        if self.names is None:
            return list(tensors.values())
        wanted = set(self.names)
        return [info for name, info in tensors.items() if name in wanted]


class Checkpoint:
    """A single file or a sharded checkpoint, opened with :func:`safecodec.safe_open`
    (which resolves paths, URLs, directories and indexes, and checks every shard against
    the index). A context manager; closing it closes every handle.

    Attributes:
        source: What the user named.
        handle: The library's handle (:class:`~safecodec.SafeOpen` or
            :class:`~safecodec.ShardedSafeOpen`).
        parts: The safetensors files, in shard order (shards are opened here).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.handle: Any = safe_open(source)
        try:
            if isinstance(self.handle, ShardedSafeOpen):
                sharded = self.handle
                self.parts = [Part(sharded.shard_path(s), sharded.open_shard(s), s,
                                   sharded.shard_tensors(s)) for s in sharded.shard_files()]
            else:
                self.parts = [Part(self.handle.name, self.handle)]
        except BaseException:
            self.close()
            raise

    @property
    def sharded(self) -> bool:
        return isinstance(self.handle, ShardedSafeOpen)

    def index_metadata(self) -> dict[str, Any] | None:
        """The index's ``metadata`` object for a sharded checkpoint, else None."""
        return self.handle.index_metadata() if self.sharded else None

    def metadata(self) -> dict[str, str] | None:
        """The user metadata: the file's, or the first shard's for a sharded checkpoint."""
        return self.handle.metadata()  # type: ignore[no-any-return]

    def where(self) -> dict[str, tuple[Part, TensorInfo]]:
        """name -> (part, info), in checkpoint order."""
        return {info.name: (part, info) for part in self.parts for info in part.infos()}

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- output helpers


#: Control characters (C0 with tab and newline, DEL, C1) that a terminal would act on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: How :func:`clean` shows the common ones (the others as ``\\xNN``).
_ESCAPES: Final = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
#: What JSON output escapes beyond ``json.dumps(ensure_ascii=False)``: DEL and C1.
_JSON_CONTROL = re.compile("[\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` with terminal control characters escaped (``\\n``, ``\\t``, ``\\x1b``...):
    names and metadata in an untrusted file must not clear the screen, retitle the window
    or start a line of their own (a forged ``OK``)."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def dump_json(data: Any, out: IO[str], **options: Any) -> None:
    """``data`` as indented JSON on ``out``, non-ASCII text kept readable but every control
    character escaped (``json.dumps`` leaves DEL and C1 raw, e.g. U+009B, a terminal's CSI)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, **options)
    out.write(_JSON_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


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
    rows = [[clean(c) for c in row] for row in rows]  # escaped before measuring
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _progress(total: int, desc: str, enabled: bool) -> ProgressBar:
    """The library's progress bar, shown only on an interactive stderr."""
    return ProgressBar(total, desc, enabled and total > 0 and sys.stderr.isatty(), file=sys.stderr)


# ----------------------------------------------------------------------------- inspect


def _inspect_data(ckpt: Checkpoint) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    shard_metadata: dict[str, dict[str, str] | None] = {}
    first_metadata: dict[str, str] | None = None
    for k, part in enumerate(ckpt.parts):
        header = part.handle.header
        if k == 0:
            first_metadata = header.raw_metadata
        files.append({"path": part.source, "header_size": header.header_size,
                      "data_start": header.data_start, "file_size": header.file_size})
        if part.shard is not None:
            shard_metadata[part.shard] = header.raw_metadata
        for info in part.infos():
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
        "metadata": ckpt.index_metadata() if ckpt.sharded else first_metadata,
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
    with Checkpoint(args.source) as ckpt:
        data = _inspect_data(ckpt)
    out = sys.stdout
    if args.json:
        dump_json(data, out)
        return 0
    tensors = data["tensors"]
    if args.sort == "name":
        tensors = sorted(tensors, key=lambda t: t["name"])
    elif args.sort == "size":
        tensors = sorted(tensors, key=lambda t: -t["bytes"])
    sharded = data["sharded"]
    for f in data["files"]:
        start_ok = "yes" if f["data_start"] % ZERO_COPY_ALIGNMENT == 0 else "no"
        print(clean(f"{f['path']}: {human_bytes(f['file_size'])}, header {f['header_size']:,} "
                    f"bytes, data starts at byte {f['data_start']:,} (64-aligned: {start_ok})"),
              file=out)
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
        print(clean(f"  {key}: {_metadata_text(value)}"), file=out)
    return 0


def _metadata_text(value: Any) -> str:
    """A metadata value as printed: strings as they are, anything else (an index's
    ``total_size``, ``safecodec.shards``...) as JSON, as ``--json`` would show it."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ----------------------------------------------------------------------------- verify


def _stored_checksums(metadata: Mapping[str, str] | None) -> bool:
    return _integrity.decode(metadata) is not None


def _check_checksums(part: Part) -> bool:
    """Verify stored per-tensor checksums; return whether the file had any.

    Raises:
        ChecksumError: listing every tensor whose bytes do not match.
    """
    if not _stored_checksums(part.handle.header.raw_metadata):
        return False
    problems = verify_handle(part.handle)
    if problems:
        raise ChecksumError("; ".join(problems))
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


def _verify_part(part: Part, finite: bool, progress: ProgressBar) -> tuple[int, int, bool]:
    """Strictly read one file; return (tensors, bytes, whether checksums were verified).
    Raises on the first failed check."""
    infos = part.infos()
    for info in infos:
        arr = part.handle.get_tensor(info.name)
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
            with Checkpoint(source) as ckpt:
                total_t = total_b = 0
                with_sums = 0
                sizes = sum(p.handle.header.file_size for p in ckpt.parts)
                with _progress(sizes, f"verify {os.path.basename(source)}", not args.quiet) as bar:
                    for part in ckpt.parts:
                        try:
                            n, b, checked = _verify_part(part, args.finite, bar)
                        except SafecodecError as exc:
                            where = f" (shard {part.shard})" if part.shard else ""
                            raise type(exc)(f"{exc}{where}") from exc
                        total_t += n
                        total_b += b
                        with_sums += checked
            index_md = ckpt.index_metadata()
            if index_md is not None:
                declared = index_md.get("total_size")
                if declared is not None and declared != total_b:
                    print(f"note: {source}: index metadata.total_size is {declared}, the shards "
                          f"hold {total_b} bytes of tensors", file=sys.stderr)
        except (SafecodecError, OSError, ValueError) as exc:
            failed += 1
            print(clean(f"FAIL {source}: {type(exc).__name__}: {exc}"))
            continue
        if not args.quiet:
            shards = f" in {counted(len(ckpt.parts), 'shard')}" if ckpt.sharded else ""
            sums = ("checksums verified" if with_sums == len(ckpt.parts) else
                    f"checksums verified in {with_sums} of {counted(len(ckpt.parts), 'file')}" if with_sums else
                    "no checksums stored")
            print(clean(f"OK   {source}: {counted(total_t, 'tensor')}, {total_b:,} bytes{shards}, {sums}"))
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
                 progress: ProgressBar) -> None:
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
    """A floating safetensors dtype from ``--dtype``: a code (``BF16``), a usual alias
    (``bf16``, ``fp16``, ``f32``...) or a NumPy/ml_dtypes name (``bfloat16``,
    ``float8_e4m3fn``), case-insensitive (:func:`safecodec._dtypes.dtype_from_text`)."""
    try:
        row = dtype_from_text(text)
    except DtypeError as exc:
        raise UsageError(f"--dtype: {exc}") from None
    if row.code not in FLOAT_CODES:
        raise UsageError(f"--dtype must be a floating type, got {text!r} ({row.code}); "
                         f"choose one of {', '.join(sorted(FLOAT_CODES))} (or bf16, fp16, fp32)")
    return row


def _lazy_part(part: Part, target: DType | None, only: list[str] | None,
               progress: ProgressBar) -> tuple[dict[str, LazyTensor], dict[str, str] | None, bool, int]:
    """One file's tensors as lazy values for the writer; returns (tensors, metadata to
    write, whether to write checksums, number of tensors cast)."""
    lazy: dict[str, LazyTensor] = {}
    cast = 0
    for info in part.infos():
        tgt = None
        if (target is not None and info.dtype.code in FLOAT_CODES and info.dtype != target
                and (only is None or any(fnmatch.fnmatchcase(info.name, p) for p in only))):
            tgt = target
            cast += 1
        lazy[info.name] = LazyTensor(part.handle, info, tgt, progress)
    metadata = part.handle.header.raw_metadata  # keep safecodec's own keys (tree record)
    checksums = _stored_checksums(metadata)
    if checksums:
        # Old digests would be wrong after a cast (and are rewritten anyway): drop them
        # and have the writer compute new ones while it streams.
        metadata = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    return lazy, metadata, checksums, cast


def _check_patterns(ckpt: Checkpoint, patterns: list[str]) -> None:
    """Raise :class:`UsageError` naming every ``--only`` pattern that matches no tensor of
    the checkpoint (a typo would otherwise convert nothing and exit 0)."""
    names = list(ckpt.where())
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        example = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(
            f"--only {', '.join(map(repr, unmatched))} matches no tensor of {ckpt.source} "
            f"({counted(len(names), 'tensor')}"
            + (f", e.g. {example}" if names else "") + "); patterns are shell-style and "
            "case-sensitive ('*' matches dots too: 'layers.*.weight')"
        )


def _output_files(ckpt: Checkpoint, output: str) -> tuple[Target, list[Target]]:
    """Where a rewrite of ``ckpt`` writes, as the resolver spells it: the output (the file,
    or the index of a sharded checkpoint) and every file it replaces (the index and each
    shard, under the input's shard names). An existing folder receives the input's name.

    Raises:
        UsageError: OUT does not fit the input (an index for a single file, or the
            reverse).
    """
    out = resolve_target(output, what="OUT")
    if not ckpt.sharded:
        if out.name.endswith(INDEX_SUFFIX):
            raise UsageError(f"{ckpt.source} is a single file; OUT must be a file, not an index")
        if out.is_dir():
            out = out.join(os.path.basename(ckpt.parts[0].source))
        return out, [out]
    if out.is_dir() or _new_folder(out):
        out = out.join(os.path.basename(ckpt.handle.name))
    if not out.name.endswith(INDEX_SUFFIX):
        raise UsageError(f"{ckpt.source} is a sharded checkpoint; OUT must be an index path "
                         f"ending in {INDEX_SUFFIX!r} or a directory")
    folder, _ = out.split()
    return out, [out] + [folder.join(part.shard) for part in ckpt.parts if part.shard]


def _new_folder(out: Target) -> bool:
    """Whether OUT of a sharded rewrite names a folder still to be made: nothing exists
    there, and the name is not a file's (``.safetensors``, an index). The sharded writer
    creates it."""
    if out.name.endswith((INDEX_SUFFIX, ".safetensors")):
        return False
    if out.fs is None:
        return not os.path.lexists(out.path)
    try:
        return not out.fs.exists(out.path)
    except Exception as exc:
        raise RemoteIOError(f"asking whether {out.name} exists failed: "
                            f"{type(exc).__name__}: {exc}") from exc


def _refuse_overwriting_input(ckpt: Checkpoint, out: Target, written: list[Target]) -> None:
    """Refuse a rewrite that would replace a file the input checkpoint is made of (its
    file, its index, one of its shards: by path, symbolic or hard link), before anything
    is written: the input must still open, unchanged, afterwards. The one exception is a
    rewrite in place (OUT is IN's file or index): the new checkpoint replaces the old one
    whole, through the same atomic publish as a re-save (one rename; for a sharded
    checkpoint every shard, then the index, or nothing), so no file of the input is left
    needing a replaced one.

    Raises:
        UsageError: naming the output file and the input file it would replace.
    """
    inputs = [part.source for part in ckpt.parts]
    if ckpt.sharded:
        inputs.append(ckpt.handle.name)
    if out.same_file(resolve_target(inputs[-1], what="IN")):
        return
    for spelled in inputs:
        source = resolve_target(spelled, what="IN")
        for target in written:
            if target.same_file(source):
                what = "IN itself" if not ckpt.sharded else f"{spelled}, a file of IN"
                raise UsageError(
                    f"OUT would overwrite {target.name}, which is {what}: the input "
                    "checkpoint must stay intact; write the output to another path")


def _rewrite(args: argparse.Namespace, target: DType | None, only: list[str] | None,
             alignment: int, verb: str) -> int:
    with Checkpoint(args.input) as ckpt:
        if only:
            _check_patterns(ckpt, only)
        progress_total = sum(p.handle.header.file_size for p in ckpt.parts)
        out, written = _output_files(ckpt, args.output)
        _refuse_overwriting_input(ckpt, out, written)
        if not ckpt.sharded:
            with _progress(progress_total, verb, not args.quiet) as bar:
                lazy, metadata, checksums, cast = _lazy_part(ckpt.parts[0], target, only, bar)
                save_file(lazy, out.name, metadata, alignment=alignment, checksums=checksums)
            _report_rewrite(args, verb, out.name, len(lazy), cast)
            return 0
        shards = []
        total_n = total_cast = 0
        any_checksums = False
        with _progress(progress_total, verb, not args.quiet) as bar:
            for part in ckpt.parts:
                assert part.shard is not None
                lazy, metadata, checksums, cast = _lazy_part(part, target, only, bar)
                any_checksums |= checksums
                shards.append((part.shard, lazy, metadata))
                total_n += len(lazy)
                total_cast += cast
            folder, index_name = out.split()
            write_checkpoint(shards, folder, index_name, alignment=alignment,
                             checksums=any_checksums, index_metadata=ckpt.index_metadata())
    _report_rewrite(args, verb, out.name, total_n, total_cast)
    return 0


def _report_rewrite(args: argparse.Namespace, verb: str, out: str, n: int, cast: int) -> None:
    if args.quiet:
        return
    aligned = total = 0
    with Checkpoint(out) as written:
        for part in written.parts:
            header = part.handle.header
            for info in part.infos():
                total += 1
                aligned += (header.data_start + info.begin) % ZERO_COPY_ALIGNMENT == 0
    cast_note = f", {cast} cast to {args.dtype}" if verb == "convert" else ""
    print(clean(f"wrote {out}: {counted(n, 'tensor')}{cast_note}; {aligned} of {total} "
                f"{'is' if aligned == 1 else 'are'} 64-byte aligned"))


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
    with Checkpoint(args.a) as a, Checkpoint(args.b) as b:
        where_a, where_b = a.where(), b.where()
        removed = [n for n in where_a if n not in where_b]
        added = [n for n in where_b if n not in where_a]
        common = [n for n in where_a if n in where_b]
        diffs: list[TensorDiff] = []
        total = sum(where_a[n][1].nbytes for n in common)
        with _progress(total, "diff", not args.quiet) as bar:
            for name in common:
                (pa, ia), (pb, ib) = where_a[name], where_b[name]
                d = TensorDiff(name, (ia.dtype.code, ib.dtype.code), (list(ia.shape), list(ib.shape)),
                               count=ia.count)
                if ia.shape == ib.shape:
                    d.max_abs_diff, d.differing = compare_arrays(
                        pa.handle.get_tensor(name), pb.handle.get_tensor(name), args.atol)
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
        dump_json({
            "a": args.a, "b": args.b, "identical": not different,
            "removed": removed, "added": added, "metadata": md_changes,
            "tensors": [{"name": d.name, "dtype": list(d.dtype), "shape": list(d.shape),
                         "max_abs_diff": d.max_abs_diff, "differing": d.differing,
                         "count": d.count, "changed": d.changed} for d in diffs],
        }, sys.stdout, allow_nan=True)
    else:
        _print_diff(args, removed, added, diffs, md_changes, a_info=None)
    return 1 if (args.exit_code and different) else 0


def _print_diff(args: argparse.Namespace, removed: list[str], added: list[str],
                diffs: list[TensorDiff], md_changes: Mapping[str, list[str | None]],
                a_info: Any) -> None:
    out = sys.stdout
    print(clean(f"--- {args.a}"), file=out)
    print(clean(f"+++ {args.b}"), file=out)
    for name in removed:
        print(clean(f"- {name}  (only in A)"), file=out)
    for name in added:
        print(clean(f"+ {name}  (only in B)"), file=out)
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
    print(f"{counted(len(diffs), 'tensor')} in both ({changed} {'differs' if changed == 1 else 'differ'}), "
          f"{len(removed)} only in A, "
          f"{len(added)} only in B, {counted(len(md_changes), 'metadata change')}", file=out)


# ----------------------------------------------------------------------------- bench


def cmd_bench(argv: list[str]) -> int:
    """Forward to the benchmark main job, imported only now (it pulls in matplotlib...)."""
    try:
        module = importlib.import_module("._bench", __package__)
    except ImportError as exc:
        print(f"safecodec bench: the benchmark suite is not available ({exc}); install "
              "with `pip install \".[bench]\"` in a clone of safecodec", file=sys.stderr)
        return 1
    return int(module.main(argv) or 0)


# ----------------------------------------------------------------------------- parser


_EPILOG = """\
A checkpoint is a .safetensors file (a local path or an fsspec URL such as
s3://bucket/x.safetensors), a Hugging Face sharded checkpoint
(*.safetensors.index.json), or a directory holding one.

exit status: 0 success; 1 invalid file, failed operation, or differences with
diff --exit-code; 2 usage error.
"""


#: Width of the help texts' own paragraphs (argparse wraps option help to the terminal).
HELP_WIDTH: Final = 78


def wrap_paragraphs(text: str, width: int = HELP_WIDTH) -> str:
    """``text`` with each paragraph (separated by a blank line) filled to ``width``."""
    return "\n\n".join(textwrap.fill(p, width) for p in text.split("\n\n"))


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
        return sub.add_parser(name, help=help, description=wrap_paragraphs(description),
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
            "writes atomically. OUT must not replace IN or any of its files (refused before "
            "anything is written). For a sharded checkpoint, OUT is the new index path or a "
            "directory (created when it does not exist) and each shard keeps its file name.")
    p.add_argument("input", metavar="IN", help="file, URL, index or directory")
    p.add_argument("output", metavar="OUT",
                   help="output file (index path or directory, created if missing, for sharded "
                   "input)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_align, parser=p)

    p = add("diff", "compare two checkpoints tensor by tensor",
            "Report tensors only in A or only in B, dtype and shape changes, metadata changes, "
            "and for tensors of equal shape the maximum absolute difference and how many "
            "elements differ (NaN equals NaN). Tensors are streamed one at a time.")
    p.add_argument("a", metavar="A", help="the first checkpoint: file, URL, index or directory")
    p.add_argument("b", metavar="B", help="the second checkpoint, compared with A")
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
    p.add_argument("input", metavar="IN", help="file, URL, index or directory")
    p.add_argument("output", metavar="OUT",
                   help="output file (index path or directory for sharded input)")
    p.add_argument("--dtype", required=True,
                   help="target, case-insensitive: a code (BF16, F16, F32, F8_E4M3...), an "
                   "alias (bf16, fp16, f16, fp32, f32, half...) or a name (bfloat16, float16...)")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="cast only tensors whose name matches (repeatable; a pattern that "
                   "matches no tensor is an error)")
    p.add_argument("--alignment", type=int, choices=(8, ZERO_COPY_ALIGNMENT),
                   default=ZERO_COPY_ALIGNMENT,
                   help=f"{ZERO_COPY_ALIGNMENT}: zero-copy layout (default); 8: the reference "
                   "writer's layout")
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
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader of our output went away (`safecodec inspect x | head`): stop quietly,
        # and point stdout at devnull so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(clean(f"safecodec {command}: error: {exc}"), file=sys.stderr)
        return 2
    except (SafecodecError, OSError, ValueError) as exc:
        # User errors (a bad file, URL, protocol, credentials...): one line, no traceback.
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(clean(f"safecodec {command}: error: {type(exc).__name__}: {text}"),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"safecodec {command}: interrupted", file=sys.stderr)
        return 130
