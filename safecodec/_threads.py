"""Copies that use every core: large copies split into pieces run on a small shared pool.

Where a copy cannot be avoided (positioned reads of a file from the reference writer,
``copy=True``, dtype narrowing, a copy out of a caller's buffer), the time goes into
moving bytes and into the kernel backing fresh memory on first touch. Both scale with
cores: ``os.preadv`` and NumPy's copies release the GIL, and page faults on distinct
pages proceed in parallel. So a copy of at least two :data:`MIN_PIECE` pieces is cut into
up to :func:`threads` pieces, whose inner boundaries fall on :data:`PIECE_ALIGN`
boundaries of the destination (each thread faults in its own huge pages); the calling
thread runs the first piece, the pool the others, and the call returns when every piece
has finished, successfully or not (a read in flight must never outlive the call that
holds the descriptor open).

Thread count, first match wins:

1. :func:`set_threads` (``safecodec.set_threads(n)``; ``None`` restores the default);
2. the environment variable ``SAFECODEC_THREADS`` (an integer >= 1), read at each copy;
3. the CPUs this process may run on (``os.sched_getaffinity``), at most
   :data:`DEFAULT_MAX`.

One thread means no pool: every copy runs in the calling thread, exactly as before.
"""

from __future__ import annotations

import _thread
import itertools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np

from ._errors import SafecodecError

if TYPE_CHECKING:  # imported on first parallel copy: `import safecodec` stays light
    from concurrent.futures import Future, ThreadPoolExecutor

__all__ = [
    "DEFAULT_MAX",
    "ENV",
    "MIN_PIECE",
    "PIECE_ALIGN",
    "copy",
    "get_threads",
    "pieces",
    "run",
    "set_threads",
]

#: Environment variable that sets the thread count (an integer >= 1).
ENV: Final = "SAFECODEC_THREADS"
#: Smallest piece worth a thread: a copy shorter than twice this runs in the caller.
MIN_PIECE: Final = 4 << 20
#: Inner piece boundaries fall on multiples of this in the destination's address space
#: (a transparent huge page), so no page is faulted in by two threads.
PIECE_ALIGN: Final = 2 << 20
#: Default thread count at most (more cores than this add little to one copy).
DEFAULT_MAX: Final = 16

T = TypeVar("T")

_setting: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = _thread.allocate_lock()
_local = _thread._local()  # .worker: this thread is one of the pool's


def set_threads(n: int | None) -> None:
    """Set how many threads large copies use (``None``: back to the default, see
    :func:`get_threads`). ``1`` runs every copy in the calling thread.

    Raises:
        SafecodecError: ``n`` is not an integer >= 1 or None.
    """
    global _setting
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SafecodecError(f"set_threads takes an integer >= 1 or None, got {n!r}")
    _setting = n


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def get_threads() -> int:
    """How many threads a large copy uses now: :func:`set_threads`'s value, else
    ``$SAFECODEC_THREADS``, else the CPUs available to this process (at most
    :data:`DEFAULT_MAX`).

    Raises:
        SafecodecError: ``SAFECODEC_THREADS`` is set, but not to an integer of at
            least 1.
    """
    if _setting is not None:
        return _setting
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise SafecodecError(f"{ENV}={env!r}: expected an integer >= 1")
        return n
    return max(1, min(_cpus(), DEFAULT_MAX))


def pieces(length: int, address: int = 0, threads: int | None = None) -> list[tuple[int, int]]:
    """``[0, length)`` cut into at most ``threads`` (default :func:`get_threads`) pieces of
    at least :data:`MIN_PIECE` bytes; inner boundaries at ``address + boundary`` multiples
    of :data:`PIECE_ALIGN`. One piece when the copy is too small to share."""
    n = min(get_threads() if threads is None else threads, length // MIN_PIECE)
    if n < 2:
        return [(0, length)]
    bounds = [0]
    for k in range(1, n):
        b = length * k // n
        b -= (address + b) % PIECE_ALIGN
        if b > bounds[-1]:
            bounds.append(b)
    bounds.append(length)
    return list(itertools.pairwise(bounds))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    from concurrent.futures import ThreadPoolExecutor

    with _lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="safecodec-copy",
                                       initializer=_mark_worker)
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _mark_worker() -> None:
    _local.worker = True


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, _thread.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run(fn: Callable[[int, int], T], parts: Sequence[tuple[int, int]]) -> list[T]:
    """``fn(a, b)`` for each piece: the first in the calling thread, the others on the
    pool. Waits for every piece, then returns their results in order, or raises the
    exception of the first piece (in order) that raised. Called from a piece (on a pool
    thread), it runs every piece in that thread: a pool thread never waits on the pool."""
    if len(parts) == 1 or getattr(_local, "worker", False):
        return [fn(a, b) for a, b in parts]
    pool = _executor(len(parts) - 1)
    futures: list[Future[T]] = [pool.submit(fn, a, b) for a, b in parts[1:]]
    results: list[Any] = [None] * len(parts)
    errors: list[BaseException | None] = [None] * len(parts)
    interrupt: BaseException | None = None
    try:
        results[0] = fn(*parts[0])
    except BaseException as exc:
        errors[0] = exc
    for k, fut in enumerate(futures, 1):
        while True:
            try:
                results[k] = fut.result()
            except BaseException as exc:
                if not fut.done():  # interrupted while waiting: the piece still runs
                    interrupt = interrupt or exc
                    continue
                errors[k] = exc
            break
    error = interrupt or next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return results


def copy(dst: np.ndarray, src: np.ndarray, casting: Any = "same_kind") -> None:
    """``np.copyto(dst, src, casting=casting)`` for arrays of one shape, in parallel pieces
    when the destination is large and both arrays are C-contiguous."""
    if dst.nbytes < 2 * MIN_PIECE or dst.shape != src.shape or not (
            dst.flags.c_contiguous and src.flags.c_contiguous):
        np.copyto(dst, src, casting=casting)
        return
    d, s = dst.reshape(-1), src.reshape(-1)
    size = d.itemsize
    parts = pieces(d.nbytes, int(dst.ctypes.data))

    def piece(a: int, b: int) -> None:
        np.copyto(d[a // size : b // size], s[a // size : b // size], casting=casting)

    # piece k covers elements [a // size, b // size): consecutive pieces share the
    # boundary's floor, so they tile the array exactly whatever the address
    run(piece, parts)


def run_concurrently(fn: Callable[[Any], Any], items: Sequence[Any],
                     max_workers: int = 8) -> list[Any]:
    """``[fn(x) for x in items]`` on a short-lived pool of at most ``max_workers`` threads
    (order kept; the first error raised). For I/O-bound work such as opening the shards of
    a checkpoint; copies use :func:`run`."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    # concurrent.futures pulls in logging (~6 ms): imported when first needed, not by
    # `import safecodec`.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))
