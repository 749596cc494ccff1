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
import math
import operator
from typing import Any, NamedTuple, cast

import numpy as np

from ._errors import SliceIndexError

__all__ = [
    "Box",
    "BoxLayout",
    "ascending_box",
    "box_layout",
    "coalesce",
    "finish_block",
    "index_key",
    "normalize_index",
    "numpy_index",
    "plan_runs",
    "selected",
    "slice_box",
    "span_starts",
    "span_strides",
]

Box = tuple[tuple[int, int, int], ...]


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


# ----------------------------------------------------------------------------- boxes


class BoxLayout(NamedTuple):
    """Where a box's bytes lie in its tensor (see the module docstring).

    Attributes:
        offset: Bytes from the tensor's first byte to the box's first element.
        shape: The block's shape (elements per axis).
        strides: The file's byte stride for each axis of the block.
        nbytes: The block's bytes.
        run: Bytes of one contiguous run (0 for an empty box).
        outer: ``(count, byte stride)`` of the axes that repeat runs, outermost first
            (adjacent axes that follow each other in the file are merged into one).
        groups: For each axis of the block, the entry of ``outer`` it belongs to, or -1
            (inside a run, or one element long).
    """

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    nbytes: int
    run: int
    outer: tuple[tuple[int, int], ...]
    groups: tuple[int, ...]

    @property
    def spans(self) -> int:
        """How many runs (or spans, after :func:`coalesce`) the box is read as."""
        return math.prod(c for c, _ in self.outer) if self.run else 0

    @property
    def extent(self) -> int:
        """Bytes from the first byte of the box to just past its last (gaps included)."""
        if not self.run:
            return 0
        return self.run + sum((c - 1) * s for c, s in self.outer)


def box_layout(shape: tuple[int, ...], box: Box, itemsize: int) -> BoxLayout:
    """The :class:`BoxLayout` of ``box`` (ascending ``(start, stop, step)`` per axis, each
    within the axis) in a C-ordered tensor of ``shape`` with ``itemsize``-byte elements.
    O(ndim): nothing is generated per row.

    Example:
        >>> lay = box_layout((4, 6), ((0, 4, 1), (0, 3, 1)), 4)  # the left half of every row
        >>> lay.run, lay.outer, lay.nbytes
        (12, ((4, 24),), 48)
    """
    ndim = len(shape)
    elem = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        elem[d] = elem[d + 1] * shape[d + 1]
    counts = tuple(len(range(*b)) for b in box)
    strides = tuple(elem[d] * box[d][2] * itemsize for d in range(ndim))
    nbytes = math.prod(counts) * itemsize
    groups = [-1] * ndim
    if not nbytes:
        return BoxLayout(0, counts, strides, 0, 0, (), tuple(groups))
    offset = sum(box[d][0] * elem[d] for d in range(ndim)) * itemsize
    # axes of one element add nothing; walk the others from the innermost outward
    axes = [d for d in range(ndim) if counts[d] > 1]
    run = itemsize
    while axes and strides[axes[-1]] == run:
        run *= counts[axes.pop()]
    outer: list[list[int]] = []  # innermost first while building
    for d in reversed(axes):
        if outer and outer[-1][1] * outer[-1][0] == strides[d]:  # continues the axis inside
            outer[-1][0] *= counts[d]
        else:
            outer.append([counts[d], strides[d]])
        groups[d] = len(outer) - 1
    n = len(outer)
    groups = [g if g < 0 else n - 1 - g for g in groups]  # outermost first
    return BoxLayout(offset, counts, strides, nbytes, run,
                     tuple((c, st) for c, st in reversed(outer)), tuple(groups))


def coalesce(layout: BoxLayout, budget: float, small_gap: int,
             max_spans: int | None = None) -> BoxLayout:
    """Widen the runs of ``layout`` level by level, innermost repeat axis first, reading
    the gaps between runs with the data, as long as the bytes read stay within ``budget``
    times the box's bytes, or the gap is at most ``small_gap`` bytes (cheaper to read than
    a request); then, while more than ``max_spans`` spans remain, the innermost level is
    widened whatever it costs (the smallest gaps first: past that many requests, the
    bytes between are cheaper). ``run`` becomes the length of a span (gaps included);
    ``outer`` keeps the axes that still repeat spans. O(ndim).

    Example:
        >>> lay = box_layout((1000, 2), ((0, 1000, 1), (0, 1, 1)), 4)  # one column
        >>> coalesce(lay, 1.25, 0).outer, coalesce(lay, 1.25, 512).outer
        (((1000, 8),), ())
    """
    run, outer = layout.run, list(layout.outer)
    limit = budget * layout.nbytes
    while outer:
        count, stride = outer[-1]
        wider = (count - 1) * stride + run
        rest = math.prod(c for c, _ in outer[:-1])
        if stride - run > small_gap and wider * rest > limit and (
                max_spans is None or count * rest <= max_spans):
            break
        outer.pop()
        run = wider
    n = len(outer)
    return layout._replace(run=run, outer=tuple(outer),
                           groups=tuple(g if g < n else -1 for g in layout.groups))


def span_starts(layout: BoxLayout) -> np.ndarray:
    """The byte offset (from the tensor's start) of every span of ``layout``, ascending,
    as one int64 array: ``layout.spans`` numbers, no Python object per span."""
    if not layout.run:
        return np.empty(0, np.int64)
    starts = np.array([layout.offset], np.int64)
    for count, stride in layout.outer:
        starts = (starts[:, None] + np.arange(count, dtype=np.int64) * stride).reshape(-1)
    return starts


def span_strides(layout: BoxLayout) -> tuple[int, ...]:
    """Byte strides of the block inside memory that holds the spans of ``layout`` back
    to back (``layout.spans`` spans of ``layout.run`` bytes, in :func:`span_starts`
    order): axes inside a span keep the file's stride; an axis that repeats spans steps
    over whole spans. The block's first element is at offset 0 of that memory."""
    packed = [0] * len(layout.outer)
    step = layout.run
    for j in range(len(layout.outer) - 1, -1, -1):
        packed[j] = step
        step *= layout.outer[j][0]
    out = []
    for d, g in enumerate(layout.groups):
        if g < 0:
            out.append(layout.strides[d] if layout.shape[d] > 1 else 0)
        else:
            out.append(packed[g] * (layout.strides[d] // layout.outer[g][1]))
    return tuple(out)


def ascending_box(per_dim: list[Any]) -> Box:
    """The ascending box a normalised index (:func:`normalize_index`) reads: each
    dimension's selected indices in ascending order (:func:`finish_block` restores the
    index's own order and drops the axes of integer indices)."""
    out = []
    for e in per_dim:
        r = selected(e)
        out.append((r[0], r[-1] + 1, r.step) if r else (0, 0, 1))
    return tuple(out)


def slice_box(per_dim: list[Any], new_axes: list[int],
              index: tuple[Any, ...]) -> tuple[Box, list[bool], list[int]]:
    """Compose a basic index of a tensor (``per_dim``, ``new_axes`` from
    :func:`normalize_index`) with ``index``, a block of the *result* (one slice per result
    axis, as a sharding's ``devices_indices_map`` gives): the ascending box of the tensor
    that block reads, which of its axes to flip, and the axes to drop (integer indices),
    so that ``finish(read(box))`` is the block.
    """
    out_axis = 0
    new = set(new_axes)
    box: list[tuple[int, int, int]] = []
    flips: list[bool] = []
    drop: list[int] = []
    for d, e in enumerate(per_dim):
        while out_axis in new:
            out_axis += 1
        if isinstance(e, int):
            box.append((e, e + 1, 1))
            flips.append(False)
            drop.append(d)
            continue
        sel = range(*e)
        part = index[out_axis] if out_axis < len(index) else slice(None)
        out_axis += 1
        r = sel[part] if isinstance(part, slice) else sel[int(part) : int(part) + 1]
        if not r:
            box.append((0, 0, 1))
            flips.append(False)
        elif r.step > 0:
            box.append((r[0], r[-1] + 1, r.step))
            flips.append(False)
        else:
            box.append((r[-1], r[0] + 1, -r.step))
            flips.append(True)
    return tuple(box), flips, drop
