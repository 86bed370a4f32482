"""How close one gradient is to another: cosine and norm ratio, per parameter and overall."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._custom_types import Params


_Scalar = Float[Array, ""]


class GradientComparison(eqx.Module):
    """What `eqtrace.compare_gradients` found. `str(comparison)` reads as a plain-text table.

    For every parameter leaf, with `e` the estimate and `r` the reference, flattened:

    $$\\cos = \\frac{\\langle e, r \\rangle}{\\lVert e \\rVert \\, \\lVert r \\rVert},
    \\qquad \\text{ratio} = \\frac{\\lVert e \\rVert}{\\lVert r \\rVert}.$$

    A cosine of 1 and a ratio of 1 mean the two gradients are equal; a cosine above 0 means
    the estimate is a descent direction for the reference's loss; the ratio says how much
    larger (above 1) or smaller (below 1) the estimate is. Where a norm is zero the formulas are
    undefined, and are set to:

    | reference | estimate | cosine | ratio |                                         |
    |-----------|----------|--------|-------|-----------------------------------------|
    | zero      | zero     | 1      | 1     | equal                                   |
    | zero      | not zero | nan    | inf   | nothing to compare the direction with   |
    | not zero  | zero     | 0      | 0     | no component along the reference        |

    **Attributes:**

    - `cosine`, `norm_ratio`: pytrees shaped like the parameters, one scalar per leaf (`None`
      where the parameters have `None`, as after `eqx.partition`).
    - `estimate_norm`, `reference_norm`: the Euclidean norm of each leaf, likewise.
    - `overall_cosine`, `overall_norm_ratio`: the same over all leaves concatenated (a leaf
      with many entries or a large gradient weighs more).
    - `paths`, `sizes`: the path of each array leaf (`jax.tree_util.keystr`, e.g.
      `.layers[0].recurrent_op.weight`) and its number of entries, in leaf order.
    """

    cosine: PyTree[_Scalar | None]
    norm_ratio: PyTree[_Scalar | None]
    estimate_norm: PyTree[_Scalar | None]
    reference_norm: PyTree[_Scalar | None]
    overall_cosine: _Scalar
    overall_norm_ratio: _Scalar
    overall_estimate_norm: _Scalar
    overall_reference_norm: _Scalar
    paths: tuple[str, ...] = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)

    def __str__(self) -> str:
        leaves = [
            jtu.tree_leaves(tree)
            for tree in (self.cosine, self.norm_ratio, self.estimate_norm, self.reference_norm)
        ]
        overall = (
            self.overall_cosine,
            self.overall_norm_ratio,
            self.overall_estimate_norm,
            self.overall_reference_norm,
        )
        try:
            rows = [
                (path, size, *(float(x) for x in values))
                for path, size, *values in zip(self.paths, self.sizes, *leaves)
            ]
            rows.append(("overall", sum(self.sizes), *(float(x) for x in overall)))
        except jax.errors.ConcretizationTypeError:
            return (
                "eqtrace.compare_gradients: the values are traced (inside `jax.jit` or another "
                "transformation); return the comparison and print it outside."
            )
        width = max([len("parameter")] + [len(row[0]) for row in rows])
        size_width = max(len("size"), *(len(f"{row[1]:,}") for row in rows))
        header = (
            f"  {'parameter':<{width}}  {'size':>{size_width}}  {'cosine':>9}  {'norm ratio':>10}"
        )
        lines = ["eqtrace.compare_gradients (estimate against reference):", header]
        for i, (path, size, cosine, ratio, e_norm, r_norm) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("  " + "-" * (len(header) - 2))
            note = _note(cosine, ratio, e_norm, r_norm)
            line = (
                f"  {path:<{width}}  {size:>{size_width},}  {_number(cosine):>9}  "
                f"{_number(ratio):>10}"
            )
            lines.append(f"{line}  {note}" if note else line)
        lines.append(f"  reading: {_reading(rows)}")
        return "\n".join(lines)


def _number(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.6f}" if x == 0 or 1e-3 <= abs(x) < 1e6 else f"{x:.3e}"


def _note(cosine: float, ratio: float, e_norm: float, r_norm: float) -> str:
    """A word on a row whose numbers need one: a zero norm or an opposing direction."""
    if r_norm == 0:
        return "both zero" if e_norm == 0 else "reference is zero"
    if e_norm == 0:
        return "estimate is zero"
    if cosine < 0:
        return "opposes the reference"
    return ""


def _equal(cosine: float, ratio: float, e_norm: float, r_norm: float) -> bool:
    """Whether a row's gradients are equal up to round-off (both zero counts as equal)."""
    if r_norm == 0 or e_norm == 0:
        return r_norm == 0 and e_norm == 0
    return 1 - cosine <= 1e-6 and abs(ratio - 1) <= 1e-3


def _reading(rows: list[tuple]) -> str:
    """The table in plain words: the overall row, and the parameters that differ where the
    overall row (which the largest gradients dominate) would hide them. Never "equal" while a
    parameter is not."""
    *leaves, (_, _, cosine, ratio, e_norm, r_norm) = rows
    differing = [row for row in leaves if not _equal(*row[2:])]
    if not differing:
        if r_norm == 0:
            return "both gradients are zero: equal."
        return "cosine 1 and ratio 1 for every parameter: equal (up to round-off)."
    # Furthest first: the smallest cosine, then the ratio furthest from 1.
    differing.sort(key=lambda row: (_finite_or(row[2], -2.0), -_distance_from_one(row[3])))
    named = "; ".join(
        f"`{path}` (cosine {_number(c)}, ratio {_number(q)})"
        for path, _, c, q, _, _ in differing[:3]
    )
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    count = f"{len(differing)} of {len(leaves)} parameters differ"
    if _equal(cosine, ratio, e_norm, r_norm):
        return (
            f"overall cosine 1 and ratio 1, but {count}: {named}{more}. The overall row weighs "
            "each parameter by the size of its gradient, so the largest ones hide the others."
        )
    return f"{_overall(cosine, ratio, e_norm, r_norm)} {count}, furthest first: {named}{more}."


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def _distance_from_one(ratio: float) -> float:
    if not math.isfinite(ratio) or ratio <= 0:
        return math.inf
    return abs(math.log(ratio))


def _overall(cosine: float, ratio: float, e_norm: float, r_norm: float) -> str:
    """The overall row in plain words, when it is not an equality."""
    if r_norm == 0:
        return "the reference is zero but the estimate is not: nothing to compare it with."
    if e_norm == 0:
        return "the estimate is zero: it gives no descent direction at all."
    if not (math.isfinite(cosine) and math.isfinite(ratio)):
        return "non-finite values (nan or inf) in the gradients."
    if cosine >= 0.99:
        direction = f"cosine {cosine:.3f}: nearly the same direction"
    elif cosine >= 0.9:
        direction = f"cosine {cosine:.3f}: close in direction"
    elif cosine > 0:
        direction = f"cosine {cosine:.3f}: a descent direction for the reference's loss, but a "
        direction += "biased one"
    else:
        direction = f"cosine {cosine:.3f}: not a descent direction for the reference's loss"
    if abs(ratio - 1) <= 0.1:
        size = "about the reference's size"
    elif ratio > 1:
        size = f"{ratio:.3g} times larger than the reference"
    elif ratio == 0:  # a norm ratio below the smallest float
        size = "vanishingly small next to the reference"
    else:
        size = f"{1 / ratio:.3g} times smaller than the reference"
    return f"{direction}, {size} (ratio {ratio:.3g})."


def _is_none(x: Any) -> bool:
    return x is None


def _structure_error(estimate: Any, reference: Any) -> str:
    """Where two pytrees of different structures differ, in words."""
    e_paths = [jtu.keystr(p) for p, _ in jtu.tree_leaves_with_path(estimate, is_leaf=_is_none)]
    r_paths = [jtu.keystr(p) for p, _ in jtu.tree_leaves_with_path(reference, is_leaf=_is_none)]
    missing = [p for p in r_paths if p not in set(e_paths)]
    extra = [p for p in e_paths if p not in set(r_paths)]
    if missing:
        return (
            f"`reference` has a leaf at `{missing[0] or '(root)'}` that `estimate` lacks "
            f"(expected the leaves {r_paths}, received {e_paths})"
        )
    if extra:
        return (
            f"`estimate` has a leaf at `{extra[0] or '(root)'}` that `reference` lacks "
            f"(expected the leaves {r_paths}, received {e_paths})"
        )
    return (
        "their pytree structures differ (the same leaf paths in different containers): "
        f"expected {jtu.tree_structure(reference, is_leaf=_is_none)}, received "
        f"{jtu.tree_structure(estimate, is_leaf=_is_none)}"
    )


def _as_array(name: str, path: str, leaf: Any) -> Array:
    if not (eqx.is_array_like(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.number)):
        raise ValueError(
            f"compare_gradients: `{name}{path}` must be a numeric array (a gradient) or `None`, "
            f"but received a {type(leaf).__name__}. Pass the gradients with respect to the "
            "parameters, e.g. `params, static = eqx.partition(model, eqx.is_inexact_array)` "
            "and the gradients of `params`."
        )
    return jnp.asarray(leaf)


def _largest(x: Array) -> Array:
    """`max |x|` (zero for an empty array), in the real dtype of `x`."""
    if x.size == 0:
        return jnp.zeros((), jnp.finfo(x.dtype).dtype)
    return jnp.max(jnp.abs(x))


def _compare(e: Array, r: Array) -> tuple[Array, Array, Array, Array]:
    """Cosine, norm ratio and the two norms of two flat arrays.

    Each array is divided by its largest magnitude first (which changes neither the cosine
    nor, once multiplied back, the ratio), so that the sums of squares neither overflow nor
    underflow, whatever the scale of the gradients.
    """
    e_scale, r_scale = _largest(e), _largest(r)
    e_zero, r_zero = e_scale == 0, r_scale == 0
    e_scale_safe = jnp.where(e_zero, 1, e_scale)
    r_scale_safe = jnp.where(r_zero, 1, r_scale)
    e_unit, r_unit = e / e_scale_safe, r / r_scale_safe
    e_norm, r_norm = jnp.linalg.norm(e_unit), jnp.linalg.norm(r_unit)  # in [1, √n] or zero
    e_norm_safe = jnp.where(e_zero, 1, e_norm)
    r_norm_safe = jnp.where(r_zero, 1, r_norm)
    cosine = jnp.clip(jnp.real(jnp.vdot(e_unit, r_unit)) / e_norm_safe / r_norm_safe, -1, 1)
    cosine = jnp.where(r_zero, jnp.where(e_zero, 1, jnp.nan), jnp.where(e_zero, 0, cosine))
    ratio = (e_norm / r_norm_safe) * (e_scale / r_scale_safe)
    ratio = jnp.where(r_zero, jnp.where(e_zero, 1, jnp.inf), ratio)
    return cosine, ratio, e_norm * e_scale, r_norm * r_scale


def compare_gradients(estimate: Params, reference: Params) -> GradientComparison:
    """Compares a gradient estimate with a reference gradient: the cosine of the angle between
    them and the ratio of their norms, for every parameter and over all of them.

    Typically `estimate` is an online gradient (`eqtrace.online_gradient` with `DRTRL` or
    `PPProp`) and `reference` the exact one (`eqtrace.bptt_gradient`) of the same loss:

    ```python
    comparison = eqtrace.compare_gradients(online_grads, bptt_grads)
    print(comparison)  # one row per parameter, then the overall row and a reading
    ```

    The arrays are computed in the leaves' dtype, without overflow or underflow, and the
    function works inside `jax.jit` (`str` needs concrete values: print outside). Zero norms
    are handled as in `GradientComparison`: both zero gives cosine 1 and ratio 1; a zero
    reference with a non-zero estimate gives cosine nan and ratio inf; a zero estimate with a
    non-zero reference gives cosine 0 and ratio 0.

    **Arguments:**

    - `estimate`: the gradient to assess, a pytree of arrays (`None` leaves allowed, as in the
      `params` half of `eqx.partition(model, eqx.is_inexact_array)`).
    - `reference`: the gradient to compare it with, of the same structure, with `None` at the
      same places and arrays of the same shapes.

    **Returns:** a `GradientComparison`: `.cosine` and `.norm_ratio` per leaf (pytrees shaped
    like the parameters), `.overall_cosine` and `.overall_norm_ratio`; `print` it for a table.

    **Raises:** a `ValueError` naming the leaf path if the two structures differ, if a leaf is
    `None` in one and an array in the other, or if two leaves' shapes differ.
    """
    e_leaves, e_def = jtu.tree_flatten_with_path(estimate, is_leaf=_is_none)
    r_leaves, r_def = jtu.tree_flatten_with_path(reference, is_leaf=_is_none)
    if e_def != r_def:
        raise ValueError(
            "compare_gradients: `estimate` and `reference` must be gradients of the same "
            f"parameters, one pytree structure, but {_structure_error(estimate, reference)}. "
            "Compute both with respect to the same `params` (one `eqx.partition` of the model)."
        )
    pairs: list[tuple[Array, Array] | None] = []
    paths, sizes = [], []
    for (path, e), (_, r) in zip(e_leaves, r_leaves):
        where = jtu.keystr(path)
        if e is None and r is None:
            pairs.append(None)
            continue
        if e is None or r is None:
            which, other = ("estimate", "reference") if e is None else ("reference", "estimate")
            shape = getattr(r if e is None else e, "shape", ())
            raise ValueError(
                f"compare_gradients: `{which}{where}` is None but `{other}{where}` is an array of "
                f"shape {shape}. Both must have `None` at the same places: compute both "
                "gradients with respect to the same `params`."
            )
        e, r = _as_array("estimate", where, e), _as_array("reference", where, r)
        if e.shape != r.shape:
            raise ValueError(
                f"compare_gradients: the gradients of `{where or '(root)'}` differ in shape: "
                f"expected {r.shape} (from `reference`), received {e.shape} (in `estimate`). "
                "Both must be gradients of the same parameters; if one is batched, average "
                "over the batch first."
            )
        dtype = jnp.result_type(e.dtype, r.dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, float)
        pairs.append((e.astype(dtype).ravel(), r.astype(dtype).ravel()))
        paths.append(where)
        sizes.append(int(np.prod(e.shape, dtype=int)))

    results = [None if pair is None else _compare(*pair) for pair in pairs]
    arrays = [pair for pair in pairs if pair is not None]
    if arrays:
        dtype = jnp.result_type(*(e.dtype for e, _ in arrays))
        e_all = jnp.concatenate([e.astype(dtype) for e, _ in arrays])
        r_all = jnp.concatenate([r.astype(dtype) for _, r in arrays])
        overall = _compare(e_all, r_all)
    else:
        overall = _compare(jnp.zeros(0), jnp.zeros(0))
    cosine, norm_ratio, estimate_norm, reference_norm = (
        jtu.tree_unflatten(r_def, [None if res is None else res[i] for res in results])
        for i in range(4)
    )
    return GradientComparison(
        cosine=cosine,
        norm_ratio=norm_ratio,
        estimate_norm=estimate_norm,
        reference_norm=reference_norm,
        overall_cosine=overall[0],
        overall_norm_ratio=overall[1],
        overall_estimate_norm=overall[2],
        overall_reference_norm=overall[3],
        paths=tuple(paths),
        sizes=tuple(sizes),
    )
