"""What a checkpoint records besides its arrays, and the comparison on restore that refuses
one written for another algorithm, hyperparameters, model or tree layout."""

import dataclasses
import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


#: The version of the metadata layout below; a checkpoint of another version is refused.
FORMAT = 1
#: Python scalars among the leaves are kept exactly in the JSON metadata (a step counter kept as
#: a Python int cannot overflow); arrays go to Orbax.
PYTHON_SCALARS = (bool, int, float)


def is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def leaf_kind(leaf: Any) -> dict:
    """What a leaf of the learner's tree is, as JSON: how it is stored and what must match."""
    if is_key(leaf):
        return {"key": str(jax.random.key_impl(leaf)), "shape": list(leaf.shape)}
    if is_array(leaf):
        return {"dtype": jnp.dtype(leaf.dtype).name, "shape": list(np.shape(leaf))}
    if isinstance(leaf, PYTHON_SCALARS):
        return {"python": type(leaf).__name__}
    # Anything else (a function, a string) is not data: taken from `like` on restore.
    return {"other": type(leaf).__qualname__}


def describe(obj: Any, *, values: bool) -> Any:
    """`obj` as JSON, to compare what a checkpoint was written for with what it is restored
    into: types, static fields and array shapes (and array values if `values`, for
    hyperparameters)."""
    if is_key(obj):
        obj = jax.random.key_data(obj)
    if is_array(obj):
        description = {"dtype": jnp.dtype(obj.dtype).name, "shape": list(np.shape(obj))}
        if values:
            description["values"] = np.asarray(obj).tolist()
        return description
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list | tuple):
        return [describe(item, values=values) for item in obj]
    if isinstance(obj, dict):
        return {str(key): describe(value, values=values) for key, value in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            field.name: describe(getattr(obj, field.name, None), values=values)
            for field in dataclasses.fields(obj)
        }
        return {"type": type(obj).__qualname__, "fields": fields}
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return {"object": f"{getattr(obj, '__module__', '')}.{name}"}


def first_difference(saved: Any, current: Any, path: str = "") -> tuple[str, Any, Any] | None:
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
            found = first_difference(saved[key], current[key], where)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            return path, f"{len(saved)} entries", f"{len(current)} entries"
        for i, (a, b) in enumerate(zip(saved, current)):
            found = first_difference(a, b, f"{path}[{i}]")
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


def check_metadata(
    where: str, step: int, metadata: dict, like: Any, algorithm: Any, model: Any
) -> None:
    """Raises a clear error if the checkpoint was written for another algorithm, model or
    layout of the tree than the ones it is restored into."""
    head = f"restore_checkpoint: the checkpoint of step {step} in {where!r}"
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{head} is of format {metadata.get('format')!r}, but this eqtrace reads format "
            f"{FORMAT}. Restore it with the eqtrace version that wrote it "
            f"({metadata.get('eqtrace')})."
        )
    saved = metadata["algorithm"]
    current = describe(algorithm, values=True)
    if saved["type"] != current["type"]:
        raise ValueError(
            f"{head} was written by the algorithm `{saved['type']}`, but `algorithm` is "
            f"`{current['type']}`: its trace is another rule's. Restore with the algorithm "
            f"that wrote it, or start a new run (in a new directory) with `{current['type']}`."
        )
    found = first_difference(saved, current)
    if found:
        path, before, now = found
        raise ValueError(
            f"{head} was written by `{saved['type']}` with other hyperparameters: "
            f"`{saved['type']}{path}` is {_words(before)} in the checkpoint but {_words(now)} in "
            f"`algorithm`. Restore with the hyperparameters it was trained with, or start a new "
            "run (in a new directory) with the new ones."
        )
    found = first_difference(metadata["model"], describe(model, values=False))
    if found:
        path, before, now = found
        raise ValueError(
            f"{head} was written for another model: `model{path}` is {_words(before)} in the "
            f"checkpoint but {_words(now)} in `model`. Build the model as it was when saved "
            "(same classes, sizes and options), or start a new run in a new directory."
        )
    current_leaves = [
        {"path": jtu.keystr(path), **leaf_kind(leaf)}
        for path, leaf in jtu.tree_flatten_with_path(like)[0]
    ]
    saved_paths = [leaf["path"] for leaf in metadata["leaves"]]
    current_paths = [leaf["path"] for leaf in current_leaves]
    if saved_paths != current_paths:  # the structure first: leaf by leaf would pair strangers
        raise ValueError(
            f"{head} does not fit `like`: {_structure_difference(saved_paths, current_paths)}. "
            "Pass a `like` built as the saved tree was (the same optimiser, batch size and "
            "structure), e.g. a freshly initialised learner."
        )
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


def _structure_difference(saved: list[str], current: list[str]) -> str:
    """Where two trees' leaf paths first differ, by top-level entry, in words."""

    def groups(paths):
        grouped: dict[str, list[str]] = {}
        for path in paths:
            match = re.match(r"(\[[^\]]*\]|\.\w+)", path)
            grouped.setdefault(match.group(1) if match else path, []).append(path)
        return grouped

    before, now = groups(saved), groups(current)
    for top in [*before, *(t for t in now if t not in before)]:
        a, b = before.get(top, []), now.get(top, [])
        if a == b:
            continue
        if not (a and b):
            which, other = ("the checkpoint", "`like`") if a else ("`like`", "the checkpoint")
            return (
                f"{which} holds {len(a or b)} leaves under `{top}` and {other} none (another "
                "structure there, e.g. the state of another optimiser)"
            )

        def sample(paths):
            shown = ", ".join(f"`{p}`" for p in paths[:2])
            return shown + (", …" if len(paths) > 2 else "")

        return (
            f"`{top}` has another structure: the checkpoint holds {len(a)} leaves there "
            f"({sample(a)}), `like` {len(b)} ({sample(b)}), e.g. the state of another optimiser"
        )
    return "their leaves are in another order"


def _leaf_words(leaf: dict) -> str:
    if "key" in leaf:
        return f"a PRNG key array of shape {tuple(leaf['shape'])} ({leaf['key']})"
    if "dtype" in leaf:
        return _array_words(leaf)
    if "python" in leaf:
        return f"a Python {leaf['python']}"
    return f"a {leaf['other']} (not saved)"


def checksum(array: Any) -> str | None:
    """A digest of an array's values, kept in the metadata so that a restore notices damaged
    array files (TensorStore reads a bit flipped in the data back silently). `None` for an
    array spread over several processes: no process sees all of it."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return None
    data = np.ascontiguousarray(np.asarray(array))
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
