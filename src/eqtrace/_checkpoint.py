"""Checkpoints of a running learner: saving, finding the latest and restoring, through Orbax."""

import importlib.metadata
import os
import warnings
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._algorithm import AbstractAlgorithm
from ._checkpoint_lock import hold_writer_lock, save_lock
from ._checkpoint_metadata import (
    FORMAT,
    PYTHON_SCALARS,
    check_metadata,
    checksum,
    describe,
    is_array,
    is_key,
    leaf_kind,
)
from ._checkpoint_steps import (
    CheckpointDamagedError,
    CompleteSteps,
    complete_steps,
    damage,
    read_metadata,
    step_folders,
)


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


def _manager(directory: str, *, writer: bool, max_to_keep: int | None = None):
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Saving returns once the checkpoint is committed: a learner that saves and then
        # crashes has its checkpoint.
        enable_async_checkpointing=False,
        # A checkpoint is written to a temporary folder and renamed when complete. Only the
        # writer, holding the directory's lock, deletes temporary folders: no other save can
        # be in progress then, so each was left by a writer that died or by a failed save of
        # its own. (A reader deleting them deleted saves in progress.)
        cleanup_tmp_directories=writer,
        create=writer,
        # Orbax lists, keeps (`max_to_keep`) and prunes complete steps only.
        step_name_format=CompleteSteps(ocp.path.step.standard_name_format()),
        # A reader reads no step's metadata on opening: a step pruned meanwhile cannot fail it.
        lightweight_initialize=not writer,
    )
    return ocp.CheckpointManager(directory, options=options)


def _directory(function: str, directory: Any) -> str:
    """`directory` as an absolute path, checked: a path, and not a regular file."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"{function}: `directory` must be a path (a `str` or `pathlib.Path`), but received "
            f"{type(directory).__name__}."
        )
    where = os.path.abspath(os.fspath(directory))
    if os.path.exists(where) and not os.path.isdir(where):
        raise NotADirectoryError(
            f"{function}: `directory` {os.fspath(directory)!r} is a file, not a checkpoint "
            "directory. Pass the directory given to `save_checkpoint` (each step is a folder "
            "in it), or a new path for a new run."
        )
    return where


def _check_step(function: str, step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(
            f"{function}: `step` must be a non-negative Python int (the number of steps taken), "
            f"but received {step!r} ({type(step).__name__})."
        )


def _check_roles(function: str, algorithm: Any, model: Any) -> None:
    """Refuses `algorithm=` and `model=` swapped (or another object as the algorithm): what is
    recorded of each differs, so a swap would only be noticed, confusingly, on restore."""
    swap = (
        " They look swapped: pass the online rule as `algorithm=` and the cell or network as "
        "`model=`."
    )
    if isinstance(model, AbstractAlgorithm):
        raise TypeError(
            f"{function}: `model` must be the model (a cell or network), but received the "
            f"algorithm {type(model).__name__}." + swap
        )
    if not isinstance(algorithm, AbstractAlgorithm):
        raise TypeError(
            f"{function}: `algorithm` must be an online rule (an instance of "
            f"`eqtrace.AbstractAlgorithm`), but received {type(algorithm).__name__}."
            + (swap if isinstance(model, AbstractAlgorithm) else "")
        )


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tree: PyTree[Any],
    *,
    algorithm: AbstractAlgorithm,
    model: Any,
    max_to_keep: int | None = 3,
    discard_newer: bool = False,
) -> None:
    """Saves a learner's condition, atomically, as the checkpoint of `step` in `directory`.

    The checkpoint holds the arrays of `tree` (through Orbax: each process writes its own
    shards, so sharded and multi-host arrays are saved without gathering them) with a digest
    of their values, its Python scalars exactly, and what `restore_checkpoint` checks: the
    algorithm's class and hyperparameters, the model's classes, static fields and array
    shapes, and the layout of `tree`. It is written to a temporary directory and renamed once
    complete, so a process killed while saving leaves the previous checkpoints intact.

    One process writes into a directory: the first save takes the directory's writer lock
    (`.eqtrace-writer.lock`), held until the process exits; another process saving there
    meanwhile gets `eqtrace.CheckpointLockedError`. Any number of processes may read.

    **Arguments:**

    - `directory`: the run's checkpoint directory (created if needed); one per run.
    - `step`: the number of steps taken, a Python int (exact at any size); checkpoints are
      named by it, and `restore_checkpoint` returns it. It must exceed the latest step saved
      (see `discard_newer`).
    - `tree`: everything the learner holds, e.g.
      `(params, opt_state, state, trace)` or a dict of them: arrays (sharded or not, PRNG keys
      included) and Python `bool`/`int`/`float` leaves; other leaves are not saved (they are
      taken from `like` on restore).
    - `algorithm`: the online rule that produced the trace.
    - `model`: the model (a cell or network), or any pytree describing it; its static fields
      and array shapes are recorded, not its values (save the parameters in `tree`).
    - `max_to_keep`: how many of the latest complete checkpoints to keep (older ones are
      deleted; incomplete step folders are neither counted nor deleted); `None` keeps all.
    - `discard_newer`: to continue a run from an older checkpoint: the checkpoints of `step`
      and later steps (of the abandoned continuation, which would otherwise stay the latest)
      are deleted first. Without it a step not above the latest is refused.

    **Returns:** nothing.
    """
    where = _directory("save_checkpoint", directory)
    _check_step("save_checkpoint", step)
    _check_roles("save_checkpoint", algorithm, model)
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
        raise ValueError(
            "save_checkpoint: `max_to_keep` must be a positive int (how many of the latest "
            f"checkpoints to keep) or None (keep all), but received {max_to_keep!r}: with "
            "fewer than one, the checkpoint just saved would be deleted."
        )
    ocp = _orbax()
    step = int(step)
    arrays, metadata = _split(step, tree, algorithm, model)
    os.makedirs(where, exist_ok=True)
    with save_lock:
        if jax.process_index() == 0:  # Orbax's primary process manages the directory.
            hold_writer_lock(where)
        steps = complete_steps(where)
        # The checkpoints that `discard_newer` deletes: of this step and later ones.
        discarded = [s for s in steps if s >= step]
        if step in steps and not discard_newer:
            raise ValueError(
                f"save_checkpoint: `directory` {os.fspath(directory)!r} already holds a "
                f"checkpoint of step {step}. Save each step once (resume with "
                "`restore_checkpoint`, which returns the step to continue from), or use a new "
                "directory for a new run; to continue from an older checkpoint and drop the "
                "later ones, pass `discard_newer=True`."
            )
        if discarded and not discard_newer:
            raise ValueError(
                f"save_checkpoint: step {step} is below the latest checkpoint in `directory` "
                f"{os.fspath(directory)!r}, of step {discarded[-1]}, which would stay the latest. "
                "Pass the number of steps taken, which grows; for a new run use a new "
                "directory; to continue from an older checkpoint and drop the later ones, "
                "pass `discard_newer=True`."
            )
        folder = os.path.join(where, str(step))
        if os.path.lexists(folder) and step not in steps:
            raise CheckpointDamagedError(
                f"save_checkpoint: `directory` {os.fspath(directory)!r} holds a folder for "
                f"step {step} that is not a complete checkpoint ({damage(folder)}), and a "
                "checkpoint cannot be written over it. Move or delete that folder."
            )
        with _manager(where, writer=True, max_to_keep=max_to_keep) as manager:
            for later in discarded:
                manager.delete(later)
            items = {"metadata": ocp.args.JsonSave(metadata)}
            if arrays:  # Orbax refuses an empty tree of arrays.
                items["arrays"] = ocp.args.StandardSave(arrays)
            # Orbax returns False, writing nothing, for a step it declines: never silently.
            if not manager.save(step, args=ocp.args.Composite(**items)):
                raise RuntimeError(f"save_checkpoint: Orbax declined to save step {step}.")
            manager.wait_until_finished()


def _split(step: int, tree: Any, algorithm: Any, model: Any) -> tuple[dict, dict]:
    """The arrays of `tree` for Orbax, and the rest (JSON) as the checkpoint's metadata."""
    arrays, scalars, leaves, checksums = {}, {}, [], {}
    for i, (path, leaf) in enumerate(jtu.tree_flatten_with_path(tree)[0]):
        kind = leaf_kind(leaf)
        leaves.append({"path": jtu.keystr(path), **kind})
        if "key" in kind:
            arrays[str(i)] = jax.random.key_data(leaf)
        elif "dtype" in kind:
            arrays[str(i)] = leaf
        elif "python" in kind:
            scalars[str(i)] = leaf
        if str(i) in arrays:
            checksums[str(i)] = checksum(arrays[str(i)])
    metadata = {
        "format": FORMAT,
        "eqtrace": importlib.metadata.version("eqtrace"),
        "step": step,
        "algorithm": describe(algorithm, values=True),
        "model": describe(model, values=False),
        "leaves": leaves,
        "scalars": scalars,
        "checksums": checksums,
    }
    return arrays, metadata


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The step of the latest complete checkpoint in `directory`.

    A step counts when its folder holds Orbax's commit marker, the step's metadata and its
    arrays' index files; a save in progress, an empty or partly copied step folder does not.
    It only reads: any number of processes (an evaluator polling while the learner trains)
    may call it.

    **Arguments:**

    - `directory`: a checkpoint directory, as given to `save_checkpoint`.

    **Returns:** the step, or `None` if the directory holds no complete checkpoint (or does
    not exist).
    """
    where = _directory("latest_checkpoint", directory)
    if not os.path.isdir(where):
        return None
    steps = complete_steps(where)
    return steps[-1] if steps else None


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
    checkpoint continues exactly as if it had not stopped. Their values are checked against
    the digest saved with them.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `like`: a tree laid out as the saved one (e.g. a freshly initialised learner):
      its arrays give the shapes, dtypes and shardings to restore into (their values are
      not used), its other leaves are returned as they are.
    - `algorithm`: the online rule to continue with; it must equal the saved one (class and
      hyperparameters).
    - `model`: the model to continue with; its classes, static fields and array shapes must
      equal the saved ones.
    - `step`: which checkpoint; if `None`, the latest complete and readable one: a later step
      that is incomplete or damaged is skipped, with a warning naming it.

    **Returns:** `(tree, step)`: the restored tree and the step it was saved at.

    **Raises:** `eqtrace.CheckpointDamagedError`, naming the step and the file, if the
    checkpoint of `step` (or, for `step=None`, every one) is incomplete or damaged.
    """
    where = _directory("restore_checkpoint", directory)
    if step is not None:
        _check_step("restore_checkpoint", step)
    _check_roles("restore_checkpoint", algorithm, model)
    shown = os.fspath(directory)
    missing = (
        f"restore_checkpoint: `directory` {shown!r} holds no "
        f"{'checkpoint' if step is None else f'checkpoint of step {step}'}"
    )
    fix = (
        "Pass the directory given to `save_checkpoint` (and a step it holds), or start the run "
        "from scratch if it was never saved."
    )
    if not os.path.isdir(where):
        raise FileNotFoundError(f"{missing} (it does not exist). {fix}")
    folders = step_folders(where)
    if not folders or (step is not None and int(step) not in folders):
        held = complete_steps(where)
        raise FileNotFoundError(f"{missing} (it holds steps {held}). {fix}")
    candidates = [int(step)] if step is not None else sorted(folders, reverse=True)
    skipped = []
    with _manager(where, writer=False) as manager:
        for candidate in candidates:
            try:
                tree = _restore_step(
                    manager, shown, folders[candidate], candidate, like, algorithm, model
                )
            except CheckpointDamagedError as error:
                if step is not None:
                    raise
                skipped.append(str(error))
                continue
            if skipped:
                warnings.warn(
                    f"restore_checkpoint: restored step {candidate}, skipping later ones: "
                    + " ".join(skipped),
                    RuntimeWarning,
                    stacklevel=2,
                )
            return tree, candidate
    raise CheckpointDamagedError(
        f"restore_checkpoint: `directory` {shown!r} holds no complete, readable checkpoint: "
        + " ".join(skipped)
    )


def _restore_step(
    manager: Any, shown: str, folder: str, step: int, like: Any, algorithm: Any, model: Any
) -> Any:
    """`like` restored from the checkpoint of `step`; `CheckpointDamagedError` naming the step
    and the file if it is incomplete or damaged."""
    head = f"restore_checkpoint: the checkpoint of step {step} in {shown!r}"
    fix = "Restore another step (`step=`), or copy the step folder again from a backup."
    problem = damage(folder)
    if problem:
        raise CheckpointDamagedError(f"{head} is incomplete or damaged: {problem}. {fix}")
    metadata = read_metadata(folder)
    check_metadata(shown, step, metadata, like, algorithm, model)
    paths_and_leaves, treedef = jtu.tree_flatten_with_path(like)
    abstract = {}
    for i, (_, leaf) in enumerate(paths_and_leaves):
        if is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            abstract[str(i)] = jax.ShapeDtypeStruct(data.shape, data.dtype)
        elif isinstance(leaf, jax.Array):
            abstract[str(i)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        elif is_array(leaf):
            abstract[str(i)] = np.asarray(leaf)
    arrays = {}
    if abstract:
        ocp = _orbax()
        try:
            arrays = manager.restore(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
            ).arrays
        except Exception as error:  # TensorStore's, JSON's, a KeyError: all mean damage here
            detail = " ".join(str(error).split())[:300].replace(folder + os.sep, "")
            raise CheckpointDamagedError(
                f"{head} is damaged: reading its arrays (the files under `arrays/`) failed with "
                f"{type(error).__name__}: {detail}. {fix}"
            ) from error
    for i, (path, _) in enumerate(paths_and_leaves):
        saved = metadata.get("checksums", {}).get(str(i))  # absent in older checkpoints
        if saved is not None and checksum(arrays[str(i)]) not in (None, saved):
            raise CheckpointDamagedError(
                f"{head} is damaged: the values read for the leaf `{jtu.keystr(path)}` differ "
                f"from those saved (their digest), so a file under `arrays/` is corrupt. {fix}"
            )
    restored = []
    for i, (_, leaf) in enumerate(paths_and_leaves):
        if is_key(leaf):
            key = jax.random.wrap_key_data(arrays[str(i)], impl=jax.random.key_impl(leaf))
            restored.append(jax.device_put(key, leaf.sharding))
        elif isinstance(leaf, jax.Array):
            restored.append(arrays[str(i)])
        elif is_array(leaf):
            restored.append(np.asarray(arrays[str(i)], dtype=leaf.dtype).reshape(np.shape(leaf)))
        elif isinstance(leaf, PYTHON_SCALARS):
            restored.append(type(leaf)(metadata["scalars"][str(i)]))
        else:
            restored.append(leaf)
    return jtu.tree_unflatten(treedef, restored)
