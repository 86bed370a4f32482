"""Three-factor learning: a learning signal the caller supplies, in place of a loss's cotangent.

Every rule's online gradient is `jax.grad` of a loss on the step's output: the rule's trace
contracted with the loss's cotangent `∂L_t/∂y_t`. A modulated loss `Σ ⟨stop_gradient(m_t), y_t⟩`
has the cotangent `m_t` itself, so its gradient along the traces is `Σ_t m_t · ∂y_t/∂θ`: the
rule's eligibility traces times a modulator. That is all three-factor learning needs, for every
rule, through the same pure step (so under `jax.vmap`, `lax.scan` and the drivers).
"""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from typing_extensions import TypeAliasType

from ._custom_types import Scalar


#: What a modulator multiplies: a step's output `y_t`, or any differentiable function of it
#: (the log-probability of a chosen action): a pytree of floating arrays.
Values = TypeAliasType("Values", Any)
#: The third factor: one array (applied to every leaf of the values), or a pytree of the
#: values' structure; each array's shape is a leading part of its values' shape. `Any`, so
#: that a wrong one meets eqtrace's own error message rather than a runtime type checker's.
Modulator = TypeAliasType("Modulator", Any)


def modulated_loss(values: Values, modulator: Modulator) -> Scalar:
    """The loss whose gradient is a three-factor update: `Σ stop_gradient(m) ⊙ values`.

    Its cotangent on `values` is the modulator `m` itself (never differentiated), so `jax.grad`
    of it through an online step gives `Σ_i m_i · ∂values_i/∂θ` along the rule's traces: the
    caller's learning signal in place of a loss's cotangent. With `m = ∂L/∂y`, the true
    learning signal of a loss `L`, it is that loss's online gradient exactly. It is a
    `loss_fn(y_t, m_t)` for the drivers: pass the modulators as the targets, e.g.
    `online_gradient(step, eqtrace.modulated_loss, params, state, trace, xs, ms,
    reduction="sum")`.

    **Arguments:**

    - `values`: what the modulator multiplies: the step's output `y_t` (a per-neuron
      modulator on a cell's output gives `m_i · e_i`, the cell's eligibility traces), or a
      function of it, e.g. `-log π(a_t | y_t)` per sample for a policy (reward-based e-prop).
      A floating array or a pytree of them.
    - `modulator`: the third factor, a real floating array (or a Python number) whose shape
      is a *leading* part of the values' shape: equal to it (one value per neuron, the
      learning signal), `(B,)` for values `(B, n)` (one per sample, e.g. a reward-prediction
      error broadcast over the neurons), or `()` (one global value). One array applies to
      every leaf of `values`; a pytree of `values`' structure gives one per leaf. It is held
      constant (`jax.lax.stop_gradient`): a modulator computed from the outputs, such as a
      TD error from the critic's value, is a signal, not part of the loss.

    **Returns:** the scalar `Σ m ⊙ values` over every element (a sum, not a mean: for a batch
    mean, divide the modulator by the batch size). Raises a `ValueError` or `TypeError` at
    trace time if the modulator's shape or dtype does not fit.
    """
    value_leaves, value_def = jtu.tree_flatten(values)
    if not value_leaves:
        raise ValueError(
            "modulated_loss: `values` holds no array, so there is nothing to modulate. Pass the "
            "step's output `y` (or a function of it, such as a log-probability)."
        )
    for path, leaf in jtu.tree_leaves_with_path(values):
        _check_values(path, leaf)
    modulators = _modulator_leaves(modulator, values, value_def, len(value_leaves))
    total = jnp.zeros((), jnp.result_type(*value_leaves))
    for (path, value), (m_path, m) in zip(jtu.tree_leaves_with_path(values), modulators):
        m = _check_modulator(m_path, m, path, value)
        m = jnp.reshape(m, jnp.shape(m) + (1,) * (jnp.ndim(value) - jnp.ndim(m)))
        total = total + jnp.sum(jax.lax.stop_gradient(m) * value)
    return total


def _check_values(path: Any, leaf: Any) -> None:
    dtype = jnp.result_type(leaf) if hasattr(leaf, "dtype") else None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        received = f"dtype {dtype.name}" if dtype is not None else f"a {type(leaf).__name__}"
        raise TypeError(
            f"modulated_loss: `values{jtu.keystr(path)}` must be a real floating array (the "
            f"output the modulator multiplies, which carries the derivative), but received "
            f"{received}. Pass the step's output `y`, or a float function of it such as "
            "`jax.nn.log_softmax(y)[a]`; an action index or a mask is not differentiable."
        )


def _modulator_leaves(modulator: Any, values: Any, value_def: Any, count: int) -> list:
    """`(path, array)` per leaf of `values`: the one modulator for all, or its own."""
    if _is_array_like(modulator):
        return [((), modulator)] * count
    leaves = jtu.tree_leaves_with_path(modulator)
    if jtu.tree_structure(modulator) != value_def:
        raise ValueError(
            "modulated_loss: `modulator` must be one array (applied to every leaf of `values`) "
            f"or a pytree of `values`' structure, but `values` is {value_def} and `modulator` "
            f"is {jtu.tree_structure(modulator)}. Pass one modulator per leaf of the step's "
            "output, in the same container."
        )
    return leaves


def _is_array_like(x: Any) -> bool:
    return (hasattr(x, "shape") and hasattr(x, "dtype")) or isinstance(x, float | int | bool)


def _check_modulator(m_path: Any, m: Any, path: Any, value: Any) -> Any:
    name = f"modulator{jtu.keystr(m_path)}"
    if isinstance(m, bool) or not _is_array_like(m):
        raise TypeError(
            f"modulated_loss: `{name}` must be a real floating array or a Python number, but "
            f"received {type(m).__name__}."
        )
    if isinstance(m, float | int):  # a Python number takes the values' dtype
        return jnp.asarray(m, jnp.result_type(value))
    dtype = jnp.result_type(m)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"modulated_loss: `{name}` must hold real floating numbers (a learning signal, a "
            f"reward-prediction error), but received dtype {jnp.dtype(dtype).name}. Convert "
            "it, e.g. `jnp.asarray(m, jnp.float32)`; an integer reward or a boolean mask "
            "would otherwise be taken as a signal without a word."
        )
    shape, value_shape = jnp.shape(m), jnp.shape(value)
    if shape != value_shape[: len(shape)]:
        expected = ", ".join(str(value_shape[:k]) for k in range(len(value_shape), -1, -1))
        raise ValueError(
            f"modulated_loss: `{name}` of shape {shape} does not fit "
            f"`values{jtu.keystr(path)}` of shape {value_shape}: a modulator's shape must be a "
            f"leading part of its values' shape ({expected}), and is broadcast over the "
            "remaining trailing axes. For a batch `(B, n)`, pass `(B, n)` (one value per "
            "neuron), `(B,)` (one per sample) or `()`; with a time axis, pass one step's "
            "modulator per step (the drivers slice `targets` along time)."
        )
    return m
