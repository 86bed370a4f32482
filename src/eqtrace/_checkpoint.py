"""Checkpoints of a running learner: its arrays through Orbax, and what must match on restore."""

import dataclasses
import importlib.metadata
import os
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._algorithm import AbstractAlgorithm


#: The version of the metadata layout below; a checkpoint of another version is refused.
_FORMAT = 1
#: Python scalars among the leaves are kept exactly in the JSON metadata (a step counter kept as
#: a Python int cannot overflow); arrays go to Orbax.
_PYTHON_SCALARS = (bool, int, float)


def _orbax():
    # Imported on first use: `import eqtrace` stays light for users who never checkpoint.
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "eqtrace's checkpoints need Orbax: `pip install orbax-checkpoint` (or "
            '`pip install "eqtrace[checkpoint]"`).'
        ) from error
    return ocp


def _manager(directory: Any, max_to_keep: int | None = None, *, create: bool = True):
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Saving returns once the checkpoint is committed: a learner that saves and then
        # crashes has its checkpoint.
        enable_async_checkpointing=False,
        # A checkpoint is written to a temporary directory and renamed when complete; one left
        # by a killed writer is never listed, and is deleted here.
        cleanup_tmp_directories=True,
        create=create,
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def _leaf_kind(leaf: Any) -> dict:
    """What a leaf of the learner's tree is, as JSON: how it is stored and what must match."""
    if _is_key(leaf):
        return {"key": str(jax.random.key_impl(leaf)), "shape": list(leaf.shape)}
    if _is_array(leaf):
        return {"dtype": jnp.dtype(leaf.dtype).name, "shape": list(np.shape(leaf))}
    if isinstance(leaf, _PYTHON_SCALARS):
        return {"python": type(leaf).__name__}
    # Anything else (a function, a string) is not data: taken from `like` on restore.
    return {"other": type(leaf).__qualname__}


def _describe(obj: Any, *, values: bool) -> Any:
    """`obj` as JSON, to compare what a checkpoint was written for with what it is restored
    into: types, static fields and array shapes (and array values if `values`, for
    hyperparameters)."""
    if _is_key(obj):
        obj = jax.random.key_data(obj)
    if _is_array(obj):
        description = {"dtype": jnp.dtype(obj.dtype).name, "shape": list(np.shape(obj))}
        if values:
            description["values"] = np.asarray(obj).tolist()
        return description
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list | tuple):
        return [_describe(item, values=values) for item in obj]
    if isinstance(obj, dict):
        return {str(key): _describe(value, values=values) for key, value in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            field.name: _describe(getattr(obj, field.name, None), values=values)
            for field in dataclasses.fields(obj)
        }
        return {"type": type(obj).__qualname__, "fields": fields}
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return {"object": f"{getattr(obj, '__module__', '')}.{name}"}


def _first_difference(saved: Any, current: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """Where two `_describe`d objects first differ: `(path, saved part, current part)`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        if "shape" in saved or "shape" in current or "object" in saved or "object" in current:
            return None if saved == current else (path, saved, current)
        if saved.get("type") != current.get("type"):
            return path, saved.get("type"), current.get("type")
        if "fields" in saved and "fields" in current:
            saved, current = saved["fields"], current["fields"]
            step = "."
        else:
            step = None
        for key in sorted(set(saved) | set(current)):
            where = f"{path}.{key}" if step else f"{path}[{key!r}]"
            if key not in saved or key not in current:
                return where, saved.get(key, "absent"), current.get(key, "absent")
            found = _first_difference(saved[key], current[key], where)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            return path, f"{len(saved)} entries", f"{len(current)} entries"
        for i, (a, b) in enumerate(zip(saved, current)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    if saved != current or type(saved) is not type(current):
        return path, saved, current
    return None


def _array_words(description: Any) -> str:
    if not isinstance(description, dict) or "shape" not in description:
        return repr(description)
    words = f"an array of dtype {description['dtype']} and shape {tuple(description['shape'])}"
    if "values" in description:
        words += f" holding {description['values']}"
    return words


def _words(value: Any) -> str:
    if isinstance(value, dict) and "shape" in value:
        return _array_words(value)
    if isinstance(value, dict) and "object" in value:
        return f"`{value['object']}`"
    return repr(value)


def _check_directory(function: str, directory: Any) -> None:
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"{function}: `directory` must be a path (a `str` or `pathlib.Path`), but received "
            f"{type(directory).__name__}."
        )


def _check_step(function: str, step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(
            f"{function}: `step` must be a non-negative Python int (the number of steps taken), "
            f"but received {step!r} ({type(step).__name__})."
        )


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tree: PyTree[Any],
    *,
    algorithm: AbstractAlgorithm,
    model: Any,
    max_to_keep: int | None = 3,
) -> None:
    """Saves a learner's condition, atomically, as the checkpoint of `step` in `directory`.

    The checkpoint holds the arrays of `tree` (through Orbax: each process writes its own
    shards, so sharded and multi-host arrays are saved without gathering them), its Python
    scalars exactly, and what `restore_checkpoint` checks: the algorithm's class and
    hyperparameters, the model's classes, static fields and array shapes, and the layout of
    `tree`. It is written to a temporary directory and renamed once complete, so a process
    killed while saving leaves the previous checkpoints intact.

    **Arguments:**

    - `directory`: the run's checkpoint directory (created if needed); one per run.
    - `step`: the number of steps taken, a Python int (exact at any size); checkpoints are
      named by it, and `restore_checkpoint` returns it.
    - `tree`: everything the learner holds, e.g.
      `(params, opt_state, state, trace)` or a dict of them: arrays (sharded or not, PRNG keys
      included) and Python `bool`/`int`/`float` leaves; other leaves are not saved (they are
      taken from `like` on restore).
    - `algorithm`: the online rule that produced the trace.
    - `model`: the model (a cell or network), or any pytree describing it; its static fields
      and array shapes are recorded, not its values (save the parameters in `tree`).
    - `max_to_keep`: how many of the latest checkpoints to keep (older ones are deleted);
      `None` keeps all.

    **Returns:** nothing.
    """
    _check_directory("save_checkpoint", directory)
    _check_step("save_checkpoint", step)
    ocp = _orbax()
    paths_and_leaves = jtu.tree_flatten_with_path(tree)[0]
    arrays, scalars, leaves = {}, {}, []
    for i, (path, leaf) in enumerate(paths_and_leaves):
        kind = _leaf_kind(leaf)
        leaves.append({"path": jtu.keystr(path), **kind})
        if "key" in kind:
            arrays[str(i)] = jax.random.key_data(leaf)
        elif "dtype" in kind:
            arrays[str(i)] = leaf
        elif "python" in kind:
            scalars[str(i)] = leaf
    metadata = {
        "format": _FORMAT,
        "eqtrace": importlib.metadata.version("eqtrace"),
        "step": int(step),
        "algorithm": _describe(algorithm, values=True),
        "model": _describe(model, values=False),
        "leaves": leaves,
        "scalars": scalars,
    }
    with _manager(directory, max_to_keep) as manager:
        if int(step) in manager.all_steps():
            raise ValueError(
                f"save_checkpoint: `directory` {os.fspath(directory)!r} already holds a "
                f"checkpoint of step {int(step)}. Save each step once (resume with "
                "`restore_checkpoint`, which returns the step to continue from), or use a new "
                "directory for a new run."
            )
        manager.save(
            int(step),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(metadata)
            ),
        )
        manager.wait_until_finished()


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The step of the latest complete checkpoint in `directory`.

    **Arguments:**

    - `directory`: a checkpoint directory, as given to `save_checkpoint`.

    **Returns:** the step, or `None` if the directory holds no complete checkpoint (or does
    not exist).
    """
    _check_directory("latest_checkpoint", directory)
    if not os.path.isdir(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def restore_checkpoint(
    directory: str | os.PathLike,
    like: PyTree[Any],
    *,
    algorithm: AbstractAlgorithm,
    model: Any,
    step: int | None = None,
) -> tuple[PyTree[Any], int]:
    """Restores a learner's condition saved by `save_checkpoint`, refusing one written for
    another algorithm, hyperparameters, model or tree layout.

    Arrays are restored with the sharding of the corresponding leaf of `like` (on the
    devices, and processes, that `like` lives on), bit for bit: a run resumed from a
    checkpoint continues exactly as if it had not stopped.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `like`: a tree laid out as the saved one (e.g. a freshly initialised learner):
      its arrays give the shapes, dtypes and shardings to restore into (their values are
      not used), its other leaves are returned as they are.
    - `algorithm`: the online rule to continue with; it must equal the saved one (class and
      hyperparameters).
    - `model`: the model to continue with; its classes, static fields and array shapes must
      equal the saved ones.
    - `step`: which checkpoint; the latest if `None`.

    **Returns:** `(tree, step)`: the restored tree and the step it was saved at.
    """
    _check_directory("restore_checkpoint", directory)
    if step is not None:
        _check_step("restore_checkpoint", step)
    ocp = _orbax()
    where = os.fspath(directory)
    missing = (
        f"restore_checkpoint: `directory` {where!r} holds no "
        f"{'checkpoint' if step is None else f'checkpoint of step {step}'}"
    )
    fix = (
        "Pass the directory given to `save_checkpoint` (and a step it holds), or start the run "
        "from scratch if it was never saved."
    )
    if not os.path.isdir(where):
        raise FileNotFoundError(f"{missing} (it does not exist). {fix}")
    with _manager(directory, create=False) as manager:
        steps = manager.all_steps()
        if not steps or (step is not None and int(step) not in steps):
            raise FileNotFoundError(f"{missing} (it holds steps {sorted(steps)}). {fix}")
        step = manager.latest_step() if step is None else int(step)
        metadata = manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        ).metadata
        _check_metadata(where, step, metadata, like, algorithm, model)
        paths_and_leaves, treedef = jtu.tree_flatten_with_path(like)
        abstract = {}
        for i, (_, leaf) in enumerate(paths_and_leaves):
            if _is_key(leaf):
                data = jax.eval_shape(jax.random.key_data, leaf)
                abstract[str(i)] = jax.ShapeDtypeStruct(data.shape, data.dtype)
            elif isinstance(leaf, jax.Array):
                abstract[str(i)] = jax.ShapeDtypeStruct(
                    leaf.shape, leaf.dtype, sharding=leaf.sharding
                )
            elif _is_array(leaf):
                abstract[str(i)] = np.asarray(leaf)
        arrays = {}
        if abstract:
            arrays = manager.restore(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
            ).arrays
    restored = []
    for i, (_, leaf) in enumerate(paths_and_leaves):
        if _is_key(leaf):
            key = jax.random.wrap_key_data(arrays[str(i)], impl=jax.random.key_impl(leaf))
            restored.append(jax.device_put(key, leaf.sharding))
        elif isinstance(leaf, jax.Array):
            restored.append(arrays[str(i)])
        elif _is_array(leaf):
            restored.append(np.asarray(arrays[str(i)], dtype=leaf.dtype).reshape(np.shape(leaf)))
        elif isinstance(leaf, _PYTHON_SCALARS):
            restored.append(type(leaf)(metadata["scalars"][str(i)]))
        else:
            restored.append(leaf)
    return jtu.tree_unflatten(treedef, restored), step


def _check_metadata(
    where: str, step: int, metadata: dict, like: Any, algorithm: Any, model: Any
) -> None:
    """Raises a clear error if the checkpoint was written for another algorithm, model or
    layout of the tree than the ones it is restored into."""
    head = f"restore_checkpoint: the checkpoint of step {step} in {where!r}"
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{head} is of format {metadata.get('format')!r}, but this eqtrace reads format "
            f"{_FORMAT}. Restore it with the eqtrace version that wrote it "
            f"({metadata.get('eqtrace')})."
        )
    saved = metadata["algorithm"]
    current = _describe(algorithm, values=True)
    if saved["type"] != current["type"]:
        raise ValueError(
            f"{head} was written by the algorithm `{saved['type']}`, but `algorithm` is "
            f"`{current['type']}`: its trace is another rule's. Restore with the algorithm "
            f"that wrote it, or start a new run (in a new directory) with `{current['type']}`."
        )
    found = _first_difference(saved, current)
    if found:
        path, before, now = found
        raise ValueError(
            f"{head} was written by `{saved['type']}` with other hyperparameters: "
            f"`{saved['type']}{path}` is {_words(before)} in the checkpoint but {_words(now)} in "
            f"`algorithm`. Restore with the hyperparameters it was trained with, or start a new "
            "run (in a new directory) with the new ones."
        )
    found = _first_difference(metadata["model"], _describe(model, values=False))
    if found:
        path, before, now = found
        raise ValueError(
            f"{head} was written for another model: `model{path}` is {_words(before)} in the "
            f"checkpoint but {_words(now)} in `model`. Build the model as it was when saved "
            "(same classes, sizes and options), or start a new run in a new directory."
        )
    current_leaves = [
        {"path": jtu.keystr(path), **_leaf_kind(leaf)}
        for path, leaf in jtu.tree_flatten_with_path(like)[0]
    ]
    for before, now in zip(metadata["leaves"], current_leaves):
        if before != now:
            raise ValueError(
                f"{head} does not fit `like`: where the checkpoint has the leaf "
                f"`{before['path']}`, {_leaf_words(before)}, `like` has `{now['path']}`, "
                f"{_leaf_words(now)}. Pass a `like` built as the saved tree was (the same "
                "optimiser, batch size and structure), e.g. a freshly initialised learner."
            )
    if len(metadata["leaves"]) != len(current_leaves):
        raise ValueError(
            f"{head} does not fit `like`: the checkpoint has {len(metadata['leaves'])} leaves "
            f"but `like` has {len(current_leaves)}. Pass a `like` built as the saved tree was "
            "(the same optimiser, batch size and structure), e.g. a freshly initialised learner."
        )


def _leaf_words(leaf: dict) -> str:
    if "key" in leaf:
        return f"a PRNG key array of shape {tuple(leaf['shape'])} ({leaf['key']})"
    if "dtype" in leaf:
        return _array_words(leaf)
    if "python" in leaf:
        return f"a Python {leaf['python']}"
    return f"a {leaf['other']} (not saved)"
