"""Index arithmetic, no I/O: NumPy basic indices of one tensor and device shards of one
array, turned into element runs in C order (and back into the result's shape).

``normalize_index`` expands an index (ints, negative ints, slices with any step,
Ellipsis, None, the empty list of ``x[[]]``) to one entry per dimension; ``plan_runs``
turns that into ascending ``(start, stop)`` element runs and the shape of the block they
fill; ``finish_block`` gives the block the index's own order and new axes. Readers
multiply runs by the item size to get byte ranges; nothing here touches bytes.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, cast

import numpy as np

from ._errors import SliceIndexError

__all__ = ["finish_block", "index_key", "normalize_index", "numpy_index", "plan_runs", "selected"]


def normalize_index(index: Any, shape: tuple[int, ...], name: str) -> tuple[list[Any], list[int]]:
    """Expand ``index`` to one entry per dimension (int or (start, stop, step) range), plus
    the positions of ``None`` (new axes) in the result. Raises SliceIndexError.

    An empty list as the whole index (``x[[]]``) selects nothing along the first axis, as
    in NumPy and the reference wheel: it is ``x[0:0]``. Other lists (advanced indexing)
    are refused."""
    if type(index) is list and not index:
        index = slice(0, 0)
    if not isinstance(index, tuple):
        index = (index,)
    for item in index:
        if not (item is Ellipsis or item is None or isinstance(item, slice)
                or (hasattr(item, "__index__") and not isinstance(item, (bool, np.bool_))
                    and np.ndim(item) == 0)):
            raise SliceIndexError(
                f"tensor {name!r}: only basic indexing is supported (ints, slices, Ellipsis, "
                f"None), got {type(item).__name__} {item!r:.60}"
            )
    ellipses = sum(1 for i in index if i is Ellipsis)
    if ellipses > 1:
        raise SliceIndexError(f"tensor {name!r}: an index can only have a single ellipsis")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if consumed > len(shape):
        raise SliceIndexError(
            f"tensor {name!r}: too many indices, shape {list(shape)} has {len(shape)} "
            f"dimensions but {consumed} were indexed"
        )
    expanded: list[Any] = []
    for item in index:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - consumed))
        else:
            expanded.append(item)
    if ellipses == 0:
        expanded.extend([slice(None)] * (len(shape) - consumed))
    per_dim: list[Any] = []
    new_axes: list[int] = []
    out_pos = 0
    dim = 0
    for item in expanded:
        if item is None:
            new_axes.append(out_pos)
            out_pos += 1
            continue
        size = shape[dim]
        if isinstance(item, slice):
            try:
                per_dim.append(item.indices(size))
            except (TypeError, ValueError) as exc:
                raise SliceIndexError(f"tensor {name!r}: bad slice {item!r}: {exc}") from None
            out_pos += 1
        else:
            try:
                i = operator.index(item)
            except TypeError as exc:
                raise SliceIndexError(f"tensor {name!r}: bad index {item!r:.40}: {exc}") from None
            if not -size <= i < size:
                raise SliceIndexError(
                    f"index {i} is out of bounds for axis {dim} with size {size} "
                    f"(tensor {name!r}, shape {list(shape)})"
                )
            per_dim.append(i + size if i < 0 else i)
        dim += 1
    return per_dim, new_axes


def selected(entry: Any) -> range:
    """The indices one dimension selects, ascending."""
    if isinstance(entry, int):
        return range(entry, entry + 1)
    r = range(*entry)
    return r if entry[2] > 0 else r[::-1]


def plan_runs(shape: tuple[int, ...], per_dim: list[Any]) -> tuple[list[tuple[int, int]], list[int]]:
    """Element runs ``(start, stop)`` in C order covering a basic index, ascending, and
    the shape of the ascending block they fill. Trailing dimensions taken whole merge into
    one run; the last partial dimension with unit step extends it."""
    ndim = len(shape)
    inner = 1
    k = ndim
    while k > 0:
        e = per_dim[k - 1]
        if isinstance(e, tuple) and e[2] == 1 and e[0] == 0 and e[1] == shape[k - 1]:
            inner *= shape[k - 1]
            k -= 1
        else:
            break
    sels = [selected(e) for e in per_dim]
    block_shape = [len(s) for s in sels]
    run_dim: int | None = None
    if k > 0 and (isinstance(per_dim[k - 1], int) or per_dim[k - 1][2] in (1, -1)):
        run_dim = k - 1
    strides = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if 0 in block_shape:
        return [], block_shape
    outer_dims = list(range(run_dim if run_dim is not None else k))
    if run_dim is not None:
        sel = sels[run_dim]
        run_len = len(sel) * inner
        run_off = sel.start * strides[run_dim]
    else:
        run_len = inner
        run_off = 0
    runs: list[tuple[int, int]] = []
    # Iterate outer indices in C order without itertools.product materialising tuples.
    counters = [0] * len(outer_dims)
    while True:
        base = run_off
        for j, d in enumerate(outer_dims):
            base += sels[d][counters[j]] * strides[d]
        if runs and runs[-1][1] == base:
            runs[-1] = (runs[-1][0], base + run_len)
        else:
            runs.append((base, base + run_len))
        j = len(outer_dims) - 1
        while j >= 0:
            counters[j] += 1
            if counters[j] < len(sels[outer_dims[j]]):
                break
            counters[j] = 0
            j -= 1
        if j < 0:
            break
    return runs, block_shape


def finish_block(block: np.ndarray, per_dim: list[Any], new_axes: list[int]) -> np.ndarray:
    """Turn the ascending block into the result of the original index."""
    local: list[Any] = []
    for e in per_dim:
        if isinstance(e, int):
            local.append(0)
        elif e[2] < 0:
            local.append(slice(None, None, -1))
        else:
            local.append(slice(None))
    out: np.ndarray = block[tuple(local)]
    for pos in new_axes:
        out = np.expand_dims(out, pos)
    return out


def numpy_index(per_dim: list[Any], new_axes: list[int]) -> tuple[Any, ...]:
    items: list[Any] = []
    for e in per_dim:
        if isinstance(e, int):
            items.append(e)
        else:
            r = range(*e)
            if not r:
                items.append(slice(0, 0))
            elif e[2] > 0:
                items.append(slice(r[0], r[-1] + 1, e[2]))
            else:  # a negative stop would wrap around: stop just past the last element
                last = r[-1] - 1
                items.append(slice(r[0], last if last >= 0 else None, e[2]))
    # Re-insert new axes at their positions in the output.
    out_items: list[Any] = []
    out_pos = 0
    it = iter(items)
    pending = sorted(new_axes)
    for item in it:
        while pending and pending[0] == out_pos:
            out_items.append(None)
            pending.pop(0)
            out_pos += 1
        out_items.append(item)
        if not isinstance(item, int):
            out_pos += 1
    out_items.extend(None for _ in pending)
    return tuple(out_items)


def index_key(index: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """A hashable, normalised form of a shard's index (one (start, stop, step) per dim)."""
    key = []
    for dim, item in itertools.zip_longest(shape, index, fillvalue=slice(None)):
        if isinstance(item, slice):
            key.append(item.indices(cast(int, dim)))  # a sharding indexes at most ndim dims
        else:  # an integer index never comes from a sharding, but be exact anyway
            i = int(item)
            key.append((i, i + 1, 1))
    return tuple(key)
