"""Orbax checkpoints as plain safetensors files.

An ``orbax.checkpoint`` handler and its argument pair, for the handler API of
``orbax-checkpoint`` 0.12 (``AsyncCheckpointHandler``, ``ocp.args``; tested with 0.12.8;
``pip install "safecodec[orbax]"``)::

    import orbax.checkpoint as ocp
    from safecodec.orbax import SafetensorsHandler, SafetensorsRestore, SafetensorsSave

    with ocp.CheckpointManager(directory, item_handlers=SafetensorsHandler()) as manager:
        manager.save(step, args=SafetensorsSave(state))
        manager.wait_until_finished()
        state = manager.restore(step, args=SafetensorsRestore(abstract_state))

Each step folder then holds, beside Orbax's own bookkeeping, one ordinary safetensors
file (:data:`DEFAULT_FILENAME` in the item's folder, ``default/`` for a single-item
manager) that any safetensors reader opens: the reference wheel, ``safecodec.load_file``,
PyTorch. It is written by :func:`safecodec.save_tree`, so the tree's structure (lists,
tuples, ``None``, scalars, custom nodes) is recorded in the file's metadata and comes back
exactly; restoring goes through :func:`safecodec.load_tree`, so a template of
``jax.ShapeDtypeStruct``\\ s with shardings gives global arrays with those shardings, each
process reading only the byte ranges of its own shards.

Saving:

- Synchronous saves (``Checkpointer``, or ``enable_async_checkpointing=False``) stream the
  arrays to the file shard by shard; nothing is copied whole.
- Asynchronous saves (the ``CheckpointManager`` default) copy every array first, in the
  calling thread: arrays that one process holds whole go to host memory, arrays spread
  over several processes are copied on their devices (same sharding). The file is then
  written in the background from the copies, so training may donate, delete or overwrite
  the saved arrays as soon as ``save`` returns. The caller's tree is never modified.
- Multi-host: when some array spans processes, every process writes its own shards into
  the one file (:func:`safecodec.jax.save_file`'s collective save; the directory must be
  shared). Otherwise only the primary process writes, since every process holds the same
  values.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future as ocp_future

from . import load_tree, save_tree

__all__ = [
    "DEFAULT_FILENAME",
    "SafetensorsHandler",
    "SafetensorsRestore",
    "SafetensorsSave",
]

#: The file's name inside the item's folder of each step.
DEFAULT_FILENAME: Final = "checkpoint.safetensors"


class SafetensorsHandler(ocp.AsyncCheckpointHandler):  # type: ignore[misc]
    """An Orbax checkpoint handler that writes one plain safetensors file per item.

    Use it as a ``CheckpointManager`` item handler (or with ``ocp.Checkpointer`` /
    ``ocp.AsyncCheckpointer``), with :class:`SafetensorsSave` and
    :class:`SafetensorsRestore` as the arguments. Those two are registered with Orbax, so
    a manager given no handler finds this one from the arguments alone.

    Args:
        filename: The file's name inside the item's folder.
        primary_host: The process that writes when every process holds every array
            whole (see the module docstring); the others write nothing.
        alignment: 64 (the zero-copy layout, default) or 8 (the reference writer's bytes).

    Examples:
        >>> import orbax.checkpoint as ocp
        >>> handler = SafetensorsHandler()
        >>> handler.filename
        'checkpoint.safetensors'
    """

    def __init__(self, filename: str = DEFAULT_FILENAME, *, primary_host: int = 0,
                 alignment: int = 64) -> None:
        if not filename or os.sep in filename or "/" in filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self.primary_host = primary_host
        self.alignment = alignment

    # ------------------------------------------------------------------------- saving

    def save(self, directory: Any, *args: Any, **kwargs: Any) -> None:
        """Write ``args.tree`` to ``directory`` now, streaming from the arrays themselves."""
        save_args = _save_args(args, kwargs)
        if self._writes_here(save_args.tree):
            save_tree(save_args.tree, self._location(directory), save_args.metadata,
                      alignment=self.alignment)

    async def async_save(self, directory: Any, *args: Any, **kwargs: Any) -> list[Any]:
        """Copy ``args.tree``'s arrays now; return the future that writes the file.

        The copies are taken before this returns (see the module docstring), so the
        caller may change or donate its arrays at once. The file is written when Orbax
        runs the returned future, after the step folder exists.
        """
        save_args = _save_args(args, kwargs)
        location = self._location(directory)
        writes = self._writes_here(save_args.tree)
        snapshot = _snapshot_tree(save_args.tree) if writes else None
        metadata, alignment = save_args.metadata, self.alignment

        async def write() -> None:
            if writes:
                save_tree(snapshot, location, metadata, alignment=alignment)

        return [_commit_future(write(), name="safecodec_save")]

    def _writes_here(self, tree: Any) -> bool:
        """Whether this process writes: every process when an array spans processes
        (the save is collective), else the primary process alone."""
        if jax.process_count() == 1 or _spans_processes(tree):
            return True
        return bool(jax.process_index() == self.primary_host)

    def _location(self, directory: Any) -> str:
        # epath paths print as local paths or as URLs (gs://...), which safecodec
        # resolves through fsspec.
        return str(directory / self.filename)

    # ------------------------------------------------------------------------- restoring

    def restore(self, directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Read the item back: onto ``args.target``'s structure, shardings and types when
        given (checked leaf by leaf), else as saved with ``jax.Array`` leaves on the
        default device.

        Raises:
            FileNotFoundError: The item's folder holds no file of this handler's name.
            safecodec.TreeStructureError: The file does not match the template.
        """
        restore_args = _restore_args(args, kwargs)
        location = self._existing(directory)
        if restore_args.target is None:
            return load_tree(location, framework="jax")
        return load_tree(location, like=restore_args.target)

    def metadata(self, directory: Any) -> Any:
        """The saved tree with ``jax.ShapeDtypeStruct`` leaves in place of arrays (scalars
        as saved), read from the header without reading the arrays' bytes; None when the
        folder holds no such file."""
        try:
            location = self._existing(directory)
        except FileNotFoundError:
            return None
        # Leaves that were not arrays come back as None here: a summary, not a restore.
        with warnings.catch_warnings(record=True):
            tree = load_tree(location)
        abstract: Any = jax.ShapeDtypeStruct
        return _map_arrays(tree, lambda x: abstract(x.shape, x.dtype))

    def _existing(self, directory: Any) -> str:
        path = directory / self.filename
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"no {self.filename!r} in {directory} (it holds {found or 'nothing'}); "
                "was this item saved with safecodec.orbax.SafetensorsHandler and this filename?"
            )
        return str(path)


@ocp.args.register_with_handler(SafetensorsHandler, for_save=True)
@dataclasses.dataclass
class SafetensorsSave(ocp.args.CheckpointArgs):  # type: ignore[misc]
    """Save a pytree with :class:`SafetensorsHandler` (as ``ocp.args.StandardSave``).

    Attributes:
        tree: Any pytree :func:`safecodec.save_tree` accepts: ``jax.Array`` (sharded or
            not), NumPy arrays and scalars, PRNG keys, dicts, lists, tuples, ``None``,
            registered nodes (Flax, NNX, Equinox, namedtuples, dataclasses).
        metadata: Optional str -> str metadata stored in the file's header.
    """

    tree: Any
    metadata: Mapping[str, str] | None = None


@ocp.args.register_with_handler(SafetensorsHandler, for_restore=True)
@dataclasses.dataclass
class SafetensorsRestore(ocp.args.CheckpointArgs):  # type: ignore[misc]
    """Restore with :class:`SafetensorsHandler` (as ``ocp.args.StandardRestore``).

    Attributes:
        target: A template: the same tree with ``jax.Array``\\ s or
            ``jax.ShapeDtypeStruct``\\ s (their shardings say where each array goes, and
            each process reads only its own shards' bytes), NumPy arrays (NumPy out), or
            concrete values. None: restore the tree as saved, arrays as ``jax.Array``\\ s
            on the default device.
    """

    target: Any = None


# ----------------------------------------------------------------------------- trees


def _map_arrays(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``tree`` rebuilt with ``fn`` applied to every array leaf (``jax.Array``, NumPy
    array or scalar); other leaves are kept as they are.

    Unlike ``jax.tree.map``, dicts keep their insertion order (JAX sorts their keys), so
    the rebuilt tree records exactly as the original does. Registered nodes are rebuilt
    through JAX's pytree registry, one level at a time.
    """
    if tree is None:
        return None
    kind = type(tree)
    if kind is dict:
        return {key: _map_arrays(value, fn) for key, value in tree.items()}
    if kind is list or kind is tuple:
        return kind(_map_arrays(value, fn) for value in tree)
    if isinstance(tree, jax.Array | np.ndarray | np.generic):
        return fn(tree)
    treedef: Any
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # a leaf of another kind
        return tree
    return treedef.unflatten([_map_arrays(child, fn) for child in children])


def _snapshot_tree(tree: Any) -> Any:
    """A copy of ``tree`` whose arrays nothing else holds: host copies of the arrays this
    process holds whole, device copies (same sharding) of those spread over processes
    and of PRNG keys. Blocks until the copies are taken; ``tree`` is not modified."""
    for leaf in jax.tree_util.tree_leaves(tree):  # start every transfer before waiting
        if isinstance(leaf, jax.Array) and leaf.is_fully_addressable and not _is_key(leaf):
            leaf.copy_to_host_async()
    return _map_arrays(tree, _copy_array)


def _copy_array(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.copy()  # the caller may write into its NumPy arrays after save returns
    if not isinstance(x, jax.Array):
        return x  # NumPy scalars are immutable
    if _is_key(x) or not x.is_fully_addressable:
        copy = jnp.copy(x)
        copy.block_until_ready()
        return copy
    return np.array(x)


def _is_key(x: Any) -> bool:
    return bool(jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def _spans_processes(tree: Any) -> bool:
    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
               for leaf in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- Orbax glue


def _save_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> SafetensorsSave:
    """The save arguments, given as ``args=SafetensorsSave(...)`` (how Orbax calls
    handlers) or positionally."""
    value = kwargs.get("args", args[0] if args else None)
    if not isinstance(value, SafetensorsSave):
        raise TypeError(
            f"SafetensorsHandler saves with args=SafetensorsSave(tree), got {type(value).__name__}")
    return value


def _restore_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> SafetensorsRestore:
    value = kwargs.get("args", args[0] if args else None)
    if value is None:
        return SafetensorsRestore()
    if not isinstance(value, SafetensorsRestore):
        raise TypeError(
            "SafetensorsHandler restores with args=SafetensorsRestore(target), got "
            f"{type(value).__name__}")
    return value


def _commit_future(coroutine: Coroutine[Any, Any, None], name: str) -> Any:
    """A future that runs ``coroutine`` in the background once the signals Orbax has
    contracted for this save (the step folder's creation) are set."""
    return ocp_future.CommitFutureAwaitingContractedSignals(coroutine, name=name)
