"""JAX saving: ``jax.Array`` values written shard by shard at their byte offsets, from one
process or from all processes of a ``jax.distributed`` job at once.

Peak host memory is one device shard (a fresh ``shard.data`` each time), never a gathered
copy of an array. Files are published through :mod:`safecodec._sink` like every other
write: a locked temporary file renamed over the target.

Multi-host (collective) saves: when some array is not fully addressable on any one
process, every process calls ``save_file`` with the same arguments and a path on a shared
filesystem. The layout is planned identically everywhere (from dtypes and shapes only).
Process 0 creates the temporary file at its final size, holding its lock, and writes the
header and the values that are whole on it; every process writes its own shards (replica
0 only) at their offsets; after a barrier process 0 renames the file into place, and a
last barrier makes it visible to every process when the call returns. If any process
fails, every process raises (a :class:`~safecodec.SafecodecError` naming the failed
process or barrier) and process 0 removes the temporary file. If a process DIES, JAX's
coordination service fails the barrier after its heartbeat timeout, and by default
terminates every other process at the same moment (``jax_enable_recoverability`` off):
process 0 may or may not get to raise and remove its temporary first. With
recoverability on, the barrier times out instead (``timeout_s``) and process 0 raises
within ``timeout_s`` plus :data:`LIVE_NODES_WAIT_S`, naming the process that is gone when
JAX can tell by then (it never blocks on that question). If process 0 itself dies, JAX terminates the other
processes at once (nothing a library can catch). A temporary file left behind is
unlocked, and the next save of the same target removes it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Mapping
from typing import Any, Final

import jax
import numpy as np

from . import _dtypes, _writer
from ._errors import DtypeError, SafecodecError
from ._header import ZERO_COPY_ALIGNMENT, PlannedTensor
from ._indexing import index_key, plan_runs
from ._packed import pack
from ._sink import LocalAtomicFile, publishing, temporary_name

__all__ = ["holds_jax_arrays", "save", "save_file", "write_shard"]

#: How long a failed collective save waits for JAX's coordination service to name the
#: processes that are gone (seconds; see :func:`_gone_processes`).
LIVE_NODES_WAIT_S: Final = 2.0


def holds_jax_arrays(tensors: Any) -> bool:
    """True when some value of the mapping ``tensors`` is a jax.Array."""
    return isinstance(tensors, Mapping) and any(isinstance(v, jax.Array) for v in tensors.values())


def _is_jax_array(value: Any) -> bool:
    return isinstance(value, jax.Array)


class _Positioned:
    """Positioned writes into a sink, a file descriptor or a bytearray."""

    def __init__(self, sink: Any = None, fd: int | None = None,
                 buf: bytearray | None = None) -> None:
        self.sink = sink
        self.fd = fd
        self.buf = buf

    def write_at(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.buf is not None:
            self.buf[offset : offset + len(view)] = view
        elif self.sink is not None:
            self.sink.write_at(offset, view)
        else:
            assert self.fd is not None
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)


def _write_numpy(sink: _Positioned, start: int, t: PlannedTensor, value: Any) -> None:
    """A host value through the writer's little-endian C-order byte stream."""
    pos = start + t.begin
    for chunk in _writer.iter_tensor_bytes([t], {t.name: value}):
        sink.write_at(pos, chunk)
        pos += chunk.nbytes


def _write_jax(sink: _Positioned, start: int, t: PlannedTensor, value: jax.Array) -> None:
    """A jax.Array written shard by shard at its byte ranges: peak host memory is one
    shard (a fresh ``shard.data`` each time, so no host copy stays cached on ``value``)."""
    dt = t.dtype
    if value.shape != t.shape:
        raise SafecodecError(
            f"tensor {t.name!r} changed shape while being written: planned {list(t.shape)}, "
            f"got {list(value.shape)}"
        )
    if t.end == t.begin:
        return
    base = start + t.begin
    for shard in value.addressable_shards:
        if shard.replica_id != 0:
            continue  # another device holds the same piece; exactly one writes it
        key = index_key(shard.index, t.shape)
        host = np.asarray(shard.data).reshape(-1)
        if not _dtypes.HOST_IS_LITTLE_ENDIAN:  # pragma: no cover - no big-endian JAX hosts
            host = host.view(dt.storage).astype(dt.storage.newbyteorder("<"))
        runs, _ = plan_runs(t.shape, list(key))
        pos = 0
        for a, b in runs:
            piece = host[pos : pos + (b - a)]
            pos += b - a
            if dt.packed:
                per = 8 // dt.bits if dt.bits == 4 else 4
                if a % per or b % per:
                    raise DtypeError(
                        f"tensor {t.name!r}: a shard of this packed {dt.code} tensor starts or "
                        f"ends inside a byte (elements {a}..{b}); shard it so every run holds "
                        f"a multiple of {per} elements, or gather it first"
                    )
                sink.write_at(base + a * dt.bits // 8, pack(np.ascontiguousarray(piece), dt, t.name))
            else:
                sink.write_at(base + a * dt.itemsize,
                              np.ascontiguousarray(piece).view(np.uint8))


def _write_all(sink: _Positioned, header: bytes, planned: list[PlannedTensor],
               values: Mapping[str, Any], *, process: int, collective: bool) -> None:
    """Write what this process owns: in a collective save, process 0 writes the header and
    every value that is whole on it; every process writes its replica-0 shards of arrays
    that are not fully addressable. Outside one, everything."""
    start = len(header)
    if not collective or process == 0:
        sink.write_at(0, header)
    for t in planned:
        value = values[t.name]
        if _is_jax_array(value):
            if value.is_fully_addressable:
                if not collective or process == 0:
                    _write_jax(sink, start, t, value)
            else:
                _write_jax(sink, start, t, value)
        elif not collective or process == 0:
            _write_numpy(sink, start, t, value)


def save(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
         alignment: int = ZERO_COPY_ALIGNMENT) -> bytes:
    """See :func:`safecodec.jax.save`."""
    header, planned, values = _writer.prepare(tensors, metadata, alignment)
    for value in values.values():
        if _is_jax_array(value) and not value.is_fully_addressable:
            raise SafecodecError(
                "save() returns bytes and cannot hold arrays spread over several processes; "
                "use save_file() on a shared filesystem (every process calls it)"
            )
    total = len(header) + (planned[-1].end if planned else 0)
    buf = bytearray(total)
    _write_all(_Positioned(buf=buf), header, planned, values, process=0, collective=False)
    return bytes(buf)


def write_shard(tensors: Mapping[str, Any], sink: Any, metadata: Mapping[str, str] | None,
                alignment: int) -> tuple[bytes, int]:
    """Write one file of JAX arrays into a seekable sink (not committed); return its header
    bytes and size (the sharded writer records them in the index)."""
    header, planned, values = _writer.prepare(tensors, metadata, alignment)
    total = len(header) + (planned[-1].end if planned else 0)
    sink.set_size(total)
    _write_all(_Positioned(sink=sink), header, planned, values, process=0, collective=False)
    return header, total


def save_file(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None,
              *, alignment: int = ZERO_COPY_ALIGNMENT, timeout_s: float = 600.0) -> None:
    """Write JAX arrays to the local ``path`` (collectively when arrays span processes);
    see :func:`safecodec.jax.save_file`. Routing (remote targets, sharded checkpoints)
    is :mod:`safecodec._api`'s."""
    header, planned, values = _writer.prepare(tensors, metadata, alignment)
    total = len(header) + (planned[-1].end if planned else 0)
    collective = jax.process_count() > 1 and any(
        _is_jax_array(v) and not v.is_fully_addressable for v in values.values()
    )
    if collective:
        _save_collective(header, planned, values, path, total, timeout_s)
        return
    with publishing(LocalAtomicFile(path, size=total)) as (sink,):
        _write_all(_Positioned(sink=sink), header, planned, values, process=0, collective=False)


_SAVE_COUNTER = itertools.count()


def _barrier(name: str, timeout_s: float, path: str) -> None:
    """Wait until every process reaches ``name``; a failure (a peer died: JAX reports it
    after its heartbeat timeout, or the wait timed out) raises SafecodecError naming the
    barrier and, when JAX knows, the processes that are gone."""
    client = _client()
    try:
        if client is not None:
            client.wait_at_barrier(name, int(timeout_s * 1000))
            return
        from jax.experimental import multihost_utils  # pragma: no cover - no distributed client

        multihost_utils.sync_global_devices(name)  # pragma: no cover
    except Exception as exc:
        # JAX names a process that stopped sending heartbeats itself; else ask it which
        # processes are gone (one more request: not made when every moment counts, since
        # JAX's default is then to terminate this process too)
        gone = [] if "heartbeat" in str(exc) else _gone_processes()
        why = (f"process {', '.join(map(str, gone))} is gone: JAX's coordination service "
               "lost it" if gone else
               f"another process died or did not arrive within {timeout_s:g} s")
        raise SafecodecError(
            f"save_file({path!r}): barrier {name!r} failed, {why}; nothing was published: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc


def _gone_processes() -> list[int]:
    """The processes JAX's coordination service no longer counts as alive (empty when it
    cannot tell within :data:`LIVE_NODES_WAIT_S`).

    The service answers once every live process has asked, or once the dead one's
    heartbeat has timed out (JAX's default: 100 s): a save that has already waited
    ``timeout_s`` must not wait that long again, so the question is asked from a daemon
    thread and abandoned after a short wait (the thread ends when the service answers).
    """
    client = _client()
    if client is None:
        return []
    count = jax.process_count()
    answer: list[Any] = []

    def ask() -> None:
        try:
            answer.append(client.get_live_nodes(list(range(count))))
        except Exception:  # an older jaxlib, or the service itself is gone
            pass

    thread = threading.Thread(target=ask, name="safecodec-live-nodes", daemon=True)
    thread.start()
    thread.join(LIVE_NODES_WAIT_S)
    if not answer:
        return []
    return [p for p in range(count) if p not in answer[0]]


def _save_collective(header: bytes, planned: list[PlannedTensor], values: Mapping[str, Any],
                     path: str, total: int, timeout_s: float) -> None:
    """Every process calls this with the same arguments; see the module docstring."""
    process = jax.process_index()
    digest = hashlib.sha256(header).hexdigest()[:12]
    seq = next(_SAVE_COUNTER)
    tag = f"safecodec-save-{digest}-{seq}"
    name_tag = f"mh-{digest}-{seq}"
    tmp = temporary_name(os.path.realpath(path), name_tag)
    failed: BaseException | None = None
    sink: LocalAtomicFile | None = None
    if process == 0:
        try:
            sink = LocalAtomicFile(path, tag=name_tag, size=total)
        except BaseException as exc:  # still reach the barrier so no process hangs
            failed = exc
        _publish(f"{tag}-create", _status(failed))
    try:
        _barrier(f"{tag}-created", timeout_s, path)
        created = _collect_one(f"{tag}-create", timeout_s)
        if created != "ok":
            if failed is not None:
                raise failed
            raise SafecodecError(
                f"save_file({path!r}): process 0 could not create the file, nothing was "
                f"written: {created}"
            )
        try:
            if sink is not None:
                _write_all(_Positioned(sink=sink), header, planned, values, process=process,
                           collective=True)
            else:
                fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
                try:
                    _write_all(_Positioned(fd=fd), header, planned, values, process=process,
                               collective=True)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException as exc:  # still reach the barrier so no process hangs
            failed = exc
        _publish(f"{tag}-status-{process}", _status(failed))
        _barrier(f"{tag}-written", timeout_s, path)
        problems = _collect(tag, jax.process_count(), timeout_s)
        if failed is not None:
            raise failed
        if problems:
            raise SafecodecError(
                f"save_file({path!r}): another process failed to write its shards, nothing "
                f"was written: {'; '.join(problems)}"
            )
        if sink is not None:
            sink.commit()
            sink = None
        _barrier(f"{tag}-renamed", timeout_s, path)
    finally:
        if sink is not None:
            sink.discard()


def _client() -> Any:
    from jax._src import distributed

    return getattr(distributed.global_state, "client", None)


def _publish(key: str, value: str) -> None:
    """Tell every process how this one's part went (through JAX's coordination service)."""
    client = _client()
    if client is not None:
        try:
            client.key_value_set(key, value)
        except Exception as exc:
            raise _coordination_error(f"publishing {key!r}", exc) from exc


def _status(failed: BaseException | None) -> str:
    """What a process publishes about its part: "ok", or its exception's type and text."""
    return "ok" if failed is None else f"{type(failed).__name__}: {failed}"


def _collect_one(key: str, timeout_s: float) -> str:
    """The status one process published under ``key`` ("ok" without a coordination
    service: then each process only knows its own failures)."""
    client = _client()
    if client is None:  # pragma: no cover - multi-process without jax.distributed
        return "ok"
    try:
        return str(client.blocking_key_value_get(key, int(timeout_s * 1000)))
    except Exception as exc:
        raise _coordination_error(f"waiting {timeout_s:g} s for {key!r}", exc) from exc


def _coordination_error(what: str, exc: BaseException) -> SafecodecError:
    """A failure of JAX's coordination service during a collective save (JaxRuntimeError
    is no SafecodecError): nothing was published."""
    gone = _gone_processes()
    note = f" (process {', '.join(map(str, gone))} is gone)" if gone else ""
    return SafecodecError(
        f"collective save_file: {what} through JAX's coordination service failed{note}; "
        f"nothing was published: {type(exc).__name__}: {str(exc)[:300]}"
    )


def _collect(tag: str, count: int, timeout_s: float) -> list[str]:
    """The failures that other processes published (empty without a coordination service:
    then a failing process raises on its own and the others cannot know)."""
    problems = []
    for p in range(count):
        status = _collect_one(f"{tag}-status-{p}", timeout_s)
        if status != "ok":
            problems.append(f"process {p}: {status}")
    return problems


