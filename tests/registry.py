"""Registries of the algorithms and the cells that the oracle tests run over (the pattern of
Diffrax's `all_ode_solvers`). A test selects the entries whose flags promise its oracle, so a
rule or a cell registered here is tested by every oracle that applies to it, and
`test_registry.py` fails until every public algorithm and cell class is registered.

A new rule is one line in `ALGORITHMS`, for example

    AlgorithmCase("uoro", eqtrace.UORO, exact=False, exact_elementwise=False,
                  needs_structure=False, statistical=True),

Selection, to keep the suite's time:

- an oracle that a stronger one implies skips the rules the stronger one covers: `exact` rules
  equal BPTT on every cell, so they are not also compared with RTRL at the first step or
  with BPTT on element-wise layers;
- oracles that hold for every rule (batch = loop, jit = no jit) run for the exact rules in
  test_foundation.py (with BPTT as well) and for the others in test_diagonal.py;
- products of every rule with every cell use `EVERY_CELL`, one configuration per cell class;
- by default such products are pairings (`helpers.pairs`): each rule with one cell and each
  cell with one rule, rotating; `EQTRACE_HYPOTHESIS_PROFILE=long` runs every pair;
- in test_blocks.py, rules with one dense trace for the whole network (`per_layer=False`,
  RTRL) are held to stepping on one network only.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax.random as jr
import pytest

import eqtrace
from eqtrace import nn
from eqtrace.nn import surrogate
from helpers import LeakyCurrent, LeakyTanh, TokenCell


@dataclasses.dataclass(frozen=True)
class AlgorithmCase:
    """An online rule with registered hyperparameters, and the oracles it promises.

    - `name`: the test id.
    - `make`: builds the rule; takes the options every rule has as keywords
      (`check_finite=True`, and `strict=False` for rules that `needs_structure`).
    - `exact`: equals BPTT for any cell or network (docs/architecture.md §3, oracle 1).
    - `exact_elementwise`: equals BPTT for one element-wise-recurrent layer under a
      stateless read-out (oracle 2).
    - `needs_structure`: analyses the cell and refuses one that breaks its assumptions
      (exact RTRL takes any cell).
    - `equals_rtrl_at_first_step`: equals exact RTRL at T = 1 from any state (oracle 3).
    - `statistical`: equals RTRL only in the mean over keys (oracle 4).
    - `supports_blocks`: `steps` and `make_online_block` give the values and derivatives
      of stepping.
    - `same_as`: the registered rule this one computes exactly on any model without the
      structure that sets it apart (e-prop is D-RTRL unless a cell feeds a leaky read-out).
      The products of every rule with every cell skip it (`rules` leaves it out unless asked
      for by `same_as=...`); its own tests hold it to that rule and to its own oracles.
    - `forward_mode`: propagates its trace with forward-mode products (`J_t U`), so it refuses a
      cell whose state goes through a `jax.custom_vjp` function (a deliberate, named refusal).
    - `cells`: for a rule made for one kind of cell (`SPECIALISED`), the registered cells it
      accepts; it refuses the generic models of the other oracles.
    - `first_step_as`: the registered rule whose first step this one's is, exactly, on any
      cell it accepts (LowRankRTRL's correction starts at zero, so its first step is its base
      rule's). The products of first-step oracles with the ways a cell can be written (op
      kinds, op orders, scalar ops) run that rule instead (`rules` leaves it out unless asked
      for by `first_step_as=...`); its own tests hold it to RTRL beyond the first step.
    """

    name: str
    make: Callable[..., eqtrace.AbstractAlgorithm]
    exact: bool
    exact_elementwise: bool
    needs_structure: bool
    equals_rtrl_at_first_step: bool = True
    statistical: bool = False
    supports_blocks: bool = True
    same_as: str | None = None
    cells: tuple[str, ...] = ()
    forward_mode: bool = False
    first_step_as: str | None = None

    @functools.cached_property
    def algorithm(self) -> eqtrace.AbstractAlgorithm:
        return self.make()

    @property
    def per_layer(self) -> bool:
        """One trace per cell of a `Sequential` (else one for its whole recurrent core)."""
        return type(self.algorithm).per_layer

    @property
    def own_blocks(self) -> bool:
        """Computes a block its own way (overrides `cell_steps`) instead of scanning its step:
        held to stepping on every model."""
        return type(self.algorithm).cell_steps is not eqtrace.AbstractAlgorithm.cell_steps


def _lowrank(*, strict: bool = True, **options) -> eqtrace.LowRankRTRL:
    """A rank-2 correction of D-RTRL (the cells here have 4 to 16 state values: between the
    base rule and RTRL); `strict` is the base rule's."""
    return eqtrace.LowRankRTRL(rank=2, base=eqtrace.DRTRL(strict=strict), **options)


ALGORITHMS: tuple[AlgorithmCase, ...] = (
    AlgorithmCase("rtrl", eqtrace.RTRL, exact=True, exact_elementwise=True, needs_structure=False),
    AlgorithmCase(
        "drtrl", eqtrace.DRTRL, exact=False, exact_elementwise=True, needs_structure=True
    ),
    AlgorithmCase(
        "snap1", eqtrace.SnAp1, exact=False, exact_elementwise=True, needs_structure=True
    ),
    # SnAp-2. Exact wherever n = 2 reaches the pattern's closure, which no flag can promise:
    # on the dense cells here (so it is not "inexact with recurrent weights") and on the
    # element-wise cells with two state leaves per neuron, but not on an ALIF (three steps).
    # test_snapn.py holds it to RTRL there and to its definition on a banded mask.
    AlgorithmCase(
        "snapn", eqtrace.SnAp, exact=False, exact_elementwise=False, needs_structure=False
    ),
    # Low-rank RTRL at rank 2: D-RTRL plus a correction that stays at round-off where D-RTRL
    # is exact (element-wise layers). test_lowrank.py holds it to RTRL at full rank, to D-RTRL
    # and SnAp-1 at rank 0, and to an error that falls with the rank.
    AlgorithmCase(
        "lowrank",
        _lowrank,
        exact=False,
        exact_elementwise=True,
        needs_structure=True,
        forward_mode=True,
        first_step_as="drtrl",
    ),
    AlgorithmCase(
        "eprop",
        eqtrace.EProp,
        exact=False,
        exact_elementwise=True,
        needs_structure=True,
        same_as="drtrl",
    ),
    AlgorithmCase(
        "ppprop",
        functools.partial(eqtrace.PPProp, 0.6),
        exact=False,
        exact_elementwise=False,
        needs_structure=True,
    ),
    AlgorithmCase(
        "uoro",
        functools.partial(eqtrace.UORO, key=jr.key(0)),
        exact=False,
        exact_elementwise=False,
        needs_structure=False,
        equals_rtrl_at_first_step=False,  # unbiased at T = 1, but a rank-one draw
        statistical=True,
        forward_mode=True,
    ),
)


#: Rules made for one kind of cell, which refuse the generic models (GRUs, gated user cells)
#: that the oracles over `ALGORITHMS` run: OTTT traces leaky integrators with a constant leak
#: only, OTPE feed-forward layers. test_ottt.py holds each to its `same_as` rule (if any) on its
#: `cells`, and runs the oracles
#: that hold for every rule there (blocks = steps, batch = loop, jit = no jit, RTRL at the
#: first step).
SPECIALISED: tuple[AlgorithmCase, ...] = (
    AlgorithmCase(
        "ottt",
        eqtrace.OTTT,
        exact=False,
        exact_elementwise=True,
        needs_structure=True,
        same_as="drtrl",
        cells=("lif-detached", "lif-detached-recurrent"),
    ),
    # OTPE: feed-forward layers (it refuses recurrent ones) with the membrane leak given, since
    # the paper's LIF differentiates its reset; it equals no other rule beyond the first step.
    AlgorithmCase(
        "otpe",
        functools.partial(eqtrace.OTPE, leak=0.8),
        exact=False,
        exact_elementwise=False,
        needs_structure=True,
        cells=("lif", "lif-detached"),
    ),
    # Approximate OTPE: the ops' inputs filtered twice instead of weight-shaped traces. On the
    # LIF with a synapse (two state leaves, which its leak `λ` does not describe); test_otpe.py
    # holds it to the authors' update on the paper's LIF.
    AlgorithmCase(
        "otpe-approx",
        functools.partial(eqtrace.OTPE, leak=0.8, approximate=True),
        exact=False,
        exact_elementwise=False,
        needs_structure=True,
        cells=("lif-detached",),
    ),
)


#: Rules that wrap a registered rule (`eqtrace.ExactWindows(rule)`): stepping them is the
#: wrapped rule, so the oracles above do not run them again; test_windows.py runs them over
#: every entry of `ALGORITHMS`. `eqtrace.Filtered(rule)` is the wrapped rule unless a layer
#: with a constant leak reads the cell (then e-prop's filter on its traces):
#: test_filtered.py holds it to its oracles.
WRAPPERS: tuple[type[eqtrace.AbstractAlgorithm], ...] = (eqtrace.ExactWindows, eqtrace.Filtered)


#: One registered rule per kind of trace leaf: RTRL's dense influence, weight-shaped traces
#: (D-RTRL; SnAp-1, e-prop and LowRankRTRL's base lay theirs out alike), SnAp-n's compact
#: influence with its index arrays, pp-prop's traces and scalar normaliser, UORO's PRNG key.
#: Oracles of machinery that only carries a trace (checkpoints, exact windows, the fidelity
#: monitor) run these by default and every rule under `EQTRACE_HYPOTHESIS_PROFILE=long`.
TRACE_KINDS = ("rtrl", "drtrl", "snapn", "ppprop", "uoro")


def rules(**flags) -> list[AlgorithmCase]:
    """The registered rules whose attributes equal `flags`, e.g. `rules(exact=False)`; by
    default without the rules that are `same_as` another."""
    flags.setdefault("same_as", None)
    return [
        case
        for case in ALGORITHMS
        if all(getattr(case, flag) == value for flag, value in flags.items())
    ]


def algorithms(**flags) -> list:
    """`pytest.param`s of the algorithms of `rules(**flags)`, with their names as ids."""
    return [pytest.param(case.algorithm, id=case.name) for case in rules(**flags)]


def algorithm_cases(**flags) -> list:
    """As `algorithms`, with the `AlgorithmCase`s as values."""
    return [pytest.param(case, id=case.name) for case in rules(**flags)]


@dataclasses.dataclass(frozen=True)
class CellCase:
    """A cell configuration, sized by the caller, and its properties.

    - `make(input_size, hidden_size, *, dtype=None, key)`: builds it (`input_size` is the
      vocabulary for token inputs).
    - `elementwise`: its recurrence is element-wise: `∂h_t/∂h_{t-1}` is block-diagonal per
      neuron (no recurrent weights), where D-RTRL is exact under a stateless read-out.
    - `state_leaves`: the number of leaves of its state, each one value per neuron.
    - `spiking`: its outputs are spikes (0 or 1).
    - `inputs`: `"vector"` (features) or `"tokens"` (integers below `input_size`).
    - `builtin`: from `eqtrace.nn` (else a cell of `helpers.py`).
    """

    make: Callable[..., eqtrace.AbstractCell]
    elementwise: bool
    state_leaves: int
    spiking: bool = False
    inputs: Literal["vector", "tokens"] = "vector"
    builtin: bool = True


def _mask(key, shape):
    mask = jr.bernoulli(key, 0.7, shape)
    return mask.at[:, 0].set(True)  # every neuron keeps an input


def _lif(*, masked=False, **options):
    def make(i, h, *, dtype=None, key):
        masks = {}
        if masked:
            masks = dict(
                input_mask=_mask(jr.fold_in(key, 1), (h, i)),
                recurrent_mask=_mask(jr.fold_in(key, 2), (h, h)),
            )
        return nn.LIF(i, h, **options, **masks, dtype=dtype, key=key)

    return make


def _builtin(cls, **options):
    return lambda i, h, *, dtype=None, key: cls(i, h, **options, dtype=dtype, key=key)


def _user(cls):
    return lambda i, h, *, dtype=None, key: cls(i, h, key=key)


#: Every built-in cell in the configurations the tests use, sizes chosen by the caller.
CELLS: dict[str, CellCase] = {
    "rnn": CellCase(_builtin(nn.RNNCell), elementwise=False, state_leaves=1),
    # The leaky RNN of rate models (RFLO's network).
    "leaky-rnn": CellCase(_builtin(nn.RNNCell, alpha=0.3), elementwise=False, state_leaves=1),
    "gru": CellCase(_builtin(nn.GRUCell), elementwise=False, state_leaves=1),
    "lstm": CellCase(_builtin(nn.LSTMCell), elementwise=False, state_leaves=2),
    "mingru": CellCase(_builtin(nn.MinGRUCell), elementwise=True, state_leaves=1),
    "lru": CellCase(_builtin(nn.LRUCell), elementwise=True, state_leaves=2),
    "lru-wide-output": CellCase(
        lambda i, h, *, dtype=None, key: nn.LRUCell(i, h, output_size=h + 1, dtype=dtype, key=key),
        elementwise=True,
        state_leaves=2,
    ),
    "lif": CellCase(_lif(), elementwise=True, state_leaves=1, spiking=True),
    "lif-zero": CellCase(
        _lif(reset="zero", tau_mem=5.0), elementwise=True, state_leaves=1, spiking=True
    ),
    "lif-recurrent-synapse": CellCase(
        _lif(recurrent=True, synapse=True, tau_syn=4),
        elementwise=False,
        state_leaves=2,
        spiking=True,
    ),
    "lif-recurrent-synapse-learn-tau": CellCase(
        _lif(recurrent=True, synapse=True, learn_tau=True),
        elementwise=False,
        state_leaves=2,
        spiking=True,
    ),
    "lif-zero-triangle": CellCase(
        _lif(recurrent=True, reset="zero", surrogate=surrogate.Triangle()),
        elementwise=False,
        state_leaves=1,
        spiking=True,
    ),
    "lif-learn-tau": CellCase(
        _lif(synapse=True, learn_tau=True, tau_mem=10.0, dt=0.5, surrogate=surrogate.Sigmoid()),
        elementwise=True,
        state_leaves=2,
        spiking=True,
    ),
    "lif-masked": CellCase(
        _lif(recurrent=True, masked=True), elementwise=False, state_leaves=1, spiking=True
    ),
    "alif": CellCase(
        _builtin(nn.ALIF, recurrent=True, beta=0.5, tau_adapt=30, surrogate=surrogate.Arctan()),
        elementwise=False,
        state_leaves=3,
        spiking=True,
    ),
    "alif-learn": CellCase(
        _builtin(
            nn.ALIF,
            recurrent=True,
            synapse=True,
            reset="zero",
            learn_tau=True,
            learn_beta=True,
            beta=0.5,
        ),
        elementwise=False,
        state_leaves=4,
        spiking=True,
    ),
    "alif-recurrent-learn-tau-beta": CellCase(
        _builtin(nn.ALIF, recurrent=True, learn_tau=True, learn_beta=True),
        elementwise=False,
        state_leaves=3,
        spiking=True,
    ),
    # The reset detached (`LIF(detach_reset=True)`): a constant leak, the cells OTTT traces.
    "lif-detached": CellCase(
        _lif(synapse=True, detach_reset=True, tau_mem=5.0),
        elementwise=True,
        state_leaves=2,
        spiking=True,
    ),
    "lif-detached-recurrent": CellCase(
        _lif(recurrent=True, detach_reset=True, tau_mem=5.0),
        elementwise=False,
        state_leaves=1,
        spiking=True,
    ),
    "readout": CellCase(_builtin(nn.LeakyReadout), elementwise=True, state_leaves=1),
    "leaky-readout": CellCase(_builtin(nn.LeakyReadout, tau=5.0), elementwise=True, state_leaves=1),
    # User-defined cells of `helpers.py`.
    "leaky-tanh": CellCase(_user(LeakyTanh), elementwise=True, state_leaves=1, builtin=False),
    "leaky-current": CellCase(_user(LeakyCurrent), elementwise=True, state_leaves=2, builtin=False),
    "tokens": CellCase(
        _user(TokenCell), elementwise=False, state_leaves=1, inputs="tokens", builtin=False
    ),
}

#: One configuration of each built-in cell class, most of its options on (two for `LIF`:
#: recurrent, and element-wise with a zero reset): the cells of the products with every rule.
EVERY_CELL = (
    "rnn",
    "gru",
    "lstm",
    "mingru",
    "lru",
    "lif-recurrent-synapse-learn-tau",
    "lif-zero",
    "alif-recurrent-learn-tau-beta",
    "readout",
)

#: Built-in cells without parameters: nothing to learn, so no gradient oracle applies to them
#: alone; test_parameter_free.py and the generated networks (grammar.py) run them between
#: learnt layers.
PARAMETER_FREE_CELLS: dict[type[eqtrace.AbstractCell], Callable[[], eqtrace.AbstractCell]] = {
    nn.DelayLine: lambda: nn.DelayLine(2, 3),
    nn.LegendreMemory: lambda: nn.LegendreMemory(2, 3, 5.0),
}

BUILTIN_CELLS = tuple(name for name, case in CELLS.items() if case.builtin)
SPIKING = frozenset(name for name, case in CELLS.items() if case.spiking)


def cells(names=None, **flags) -> list[str]:
    """The names in `names` (default: every registered cell) whose properties equal `flags`
    (e.g. `elementwise=True`), to parametrise over."""
    return [
        name
        for name in (CELLS if names is None else names)
        if all(getattr(CELLS[name], flag) == value for flag, value in flags.items())
    ]


def make_cell(name: str, key, input_size: int = 3, hidden_size: int = 4, dtype=None):
    """The registered cell `name`, by default sized input 3 → 4 neurons."""
    return CELLS[name].make(input_size, hidden_size, dtype=dtype, key=key)
