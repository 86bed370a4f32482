import abc
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._custom_types import Input, State


class AbstractCell(eqx.Module):
    """One recurrent layer: a pure map from `(state, x)` to `(new_state, y)`.

    A cell implements:

    - `init_state()`: the state of a single sample (no batch axis; batch with `jax.vmap`).
    - `__call__(state, x) -> (new_state, y)`: one time step, carry first as in a `lax.scan` body.
    - `output(state)` (optional): the output as a function of the *new* state alone. The default
      returns the state itself, which suits single-leaf cells. Online rules need `dL/dh_t` at the
      new state, so `y` must be `output(new_state)`; `eqtrace.check` verifies this.

    Synaptic ops (`eqtrace.nn.Linear`, `eqx.nn.Linear`, `eqx.nn.Conv*`, `eqx.nn.Embedding`) held
    as fields are recognised by the diagonal rules; everything else in the cell should act
    element-wise on its neurons.
    """

    @abc.abstractmethod
    def init_state(self) -> State:
        """Returns the initial state of one sample (no batch axis)."""

    @abc.abstractmethod
    def __call__(self, state: State, x: Input) -> tuple[State, Any]:
        """Advances the cell by one step and returns `(new_state, output(new_state))`."""

    def output(self, state: State) -> Any:
        """The cell's output as a function of its (new) state. Defaults to the state itself."""
        return state


def has_parameters(layer: Any) -> bool:
    """Whether `layer` is a cell with something to learn. A cell without parameters (a delay
    line, a fixed filter, an input encoder) needs no trace: per-layer rules run it exactly
    within each step, like a stateless layer, and keep no trace for it."""
    return isinstance(layer, AbstractCell) and bool(
        jtu.tree_leaves(eqx.filter(layer, eqx.is_inexact_array))
    )
