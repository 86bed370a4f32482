"""OTPE: e-prop's filtered traces on every feed-forward spiking layer, with the surrogate
derivative sent to the layer below replaced by its leaky average (Summe et al. 2023); and its
approximate form, which keeps each op's input filtered twice instead of weight-shaped traces."""

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._link import exact_tangent
from .._ops import algebra
from .._probing import probed_call
from .._structure import CellStructure, StructureError, constant_leak, input_owners
from ._diagonal import AbstractDiagonalAlgorithm, axis_at, from_outputs, op_dtype, state_dtype
from ._eprop import EProp, EPropTrace


class OTPEInputTraces(eqx.Module):
    """Approximate OTPE's estimate of `R̂` (`OTPE(approximate=True)`): per call of a synaptic
    op, its input vector filtered once and twice by `λ`, stacked, `(2, *input_shape)`:
    `â_t = λ â_{t-1} + a_t` and `ẑ_t = λ ẑ_{t-1} + â_t` (`None` for calls that do not reach
    the state); the same for the constant input 1 of the op's bias, `(2,)` (`None` for an op
    without a bias)."""

    inputs: tuple[Array | None, ...]
    biases: tuple[Array | None, ...]


class OTPETrace(eqx.Module):
    """OTPE's trace: its estimate `R̂` (`filtered`: e-prop's trace, D-RTRL's eligibility
    traces `E` and their copies filtered by `λ`; with `approximate=True`, the ops' inputs
    filtered twice, an `OTPEInputTraces`); per call of a synaptic op, the leaky sum of the
    output's sensitivity to the op's output, `Σ_τ λ^{t-τ} ∂y_τ/∂u_τ` (shaped like the op's
    output; `None` for calls that do not reach the state); and its normaliser
    `r_t = 1 + λ + … + λ^{t-1}`, so that `ḡ_t` is their quotient."""

    filtered: EPropTrace | OTPEInputTraces
    surrogates: tuple[Array | None, ...]
    normaliser: Float[Array, ""]


class OTPE(AbstractDiagonalAlgorithm[OTPETrace]):
    """Online training with postsynaptic estimates (Summe, Schaefer and Joshi, "Estimating
    Post-Synaptic Effects for Online Training of Feed-Forward SNNs", arXiv:2311.16151, 2023),
    for feed-forward layers of spiking (or other element-wise) neurons.

    With `λ` the membrane leak (one for the network, as in the paper), each layer keeps
    D-RTRL's element-wise traces `E_t` (so `ds_t/dθ = (∂s_t/∂h_t) E_t` within the neuron),
    and

    $$
    \\hat R_t = λ \\hat R_{t-1} + \\frac{ds_t}{dθ}, \\qquad
    r_t = λ r_{t-1} + 1, \\qquad
    \\bar g_t = \\frac{λ r_{t-1}}{r_t} \\bar g_{t-1} + \\frac{1}{r_t} \\frac{∂s_t}{∂u_t},
    $$

    from zeros, with `u_t` the output of a synaptic op (`W x_t`) and `∂s_t/∂u_t` the surrogate
    derivative. At each step the parameters' gradient is `δ_t ⊙ \\hat R_t`, with `δ_t` the
    cotangent arriving on the layer's output `s_t`, and the layer sends `Wᵀ(δ_t ⊙ \\bar g_t)`
    to the layer below, where the other rules send the exact `Wᵀ(δ_t ⊙ ∂s_t/∂u_t)`. `\\hat R`
    estimates a weight's effect on the next layer's membrane, which leaks with `λ`; `\\bar g`
    is the `λ`-weighted average of the surrogate derivatives. These are the equations of the
    authors' code for the paper (`OTPE.py` of Intelligent-Microsystems-Lab/OTPE, class
    `OTPE`), for any element-wise cell with the credit through other paths from the input
    (if any) kept exact.

    `\\hat R` is e-prop's filtered trace (`eqtrace.EProp` under a leaky read-out of decay `λ`),
    kept on every layer; the normaliser `r_t` is a float bounded by `1/(1 − λ)`, so there is
    no step counter to overflow. At the first step OTPE equals D-RTRL and RTRL exactly.
    Memory per sample: e-prop's (`2·|θ|` for one state leaf) plus one value per op output.

    **Approximate OTPE** (`approximate=True`; the paper's approximate variant, class
    `Approx_OTPE` of the same file) drops the weight-shaped traces: it takes the surrogate
    derivatives out of `\\hat R` as their average `\\bar g_t` and the membrane as a leaky
    integrator of the op's output with leak `λ` (the reset ignored), so that
    `\\hat R_t ≈ \\bar g_t ⊗ \\hat z_t` with the op's input `a_t` filtered twice,

    $$
    \\hat a_t = λ \\hat a_{t-1} + a_t, \\qquad \\hat z_t = λ \\hat z_{t-1} + \\hat a_t,
    \\qquad ∇W \\mathrel{+}= (δ_t ⊙ \\bar g_t) ⊗ \\hat z_t,
    $$

    and the same credit `Wᵀ(δ_t ⊙ \\bar g_t)` to the layer below (a bias is the weight of the
    constant input 1, filtered the same way). Memory per sample: two values per op input, one
    per op output and the normaliser, independent of `|θ|` (OTTT's order: `2·50 + 128 + 1`
    values for `LIF(50, 128)` instead of OTPE's `2·6 400 + 128 + 1`). It is an option of
    this class rather than a rule of its own because it shares everything but `\\hat R`: the
    leak, the refusals, `\\bar g` and the credit sent down. It equals OTPE at the first step
    (both RTRL), and at every step on a linear leaky integrator of leak `λ` (constant
    surrogate derivative). Parameters outside the ops (learnt time constants) have no input
    to filter and are refused. The state's own derivative (for a loss on the state) is
    `∂h_t/∂u_t · (δW \\hat a_t)`, D-RTRL's when the reset is detached.

    **Arguments:**

    - `leak`: `λ ∈ (0, 1)`, the membrane leak, `exp(−Δt/τ_mem)` for `eqtrace.nn.LIF`. By
      default it is read from the code of the cell's step, which needs a constant scalar leak
      (one state leaf, the reset detached: `LIF(..., detach_reset=True)`); give it for the
      paper's LIF, whose reset is differentiated, or for a cell with a synapse.
    - `approximate`: run approximate OTPE (above) instead of OTPE.
    - `strict`, `trace_dtype`, `check_finite`: as for `eqtrace.DRTRL`.
    """

    leak: float | None = None
    approximate: bool = False
    strict: bool = True
    trace_dtype: Any = None
    check_finite: bool = False

    def __check_init__(self):
        if self.leak is not None and not 0 < self.leak < 1:
            raise ValueError(
                "OTPE: `leak` must be the membrane leak λ = exp(−Δt/τ_mem), in (0, 1), but "
                f"received {self.leak}."
            )
        if not isinstance(self.approximate, (bool, np.bool_)):
            raise TypeError(
                "OTPE: `approximate` must be True (approximate OTPE) or False (OTPE), but "
                f"received {self.approximate!r}."
            )

    def _decay(self, structure: CellStructure) -> float:
        if self.leak is not None:
            return float(self.leak)
        leak = structure.constant_leak
        assert leak is not None and leak.leak is not None  # `refuse` checked it
        return float(np.asarray(leak.leak).reshape(-1)[0])

    def _eprop(self, structure: CellStructure) -> EProp:
        """e-prop with the filter `κ = λ`, prepared for the same cell."""
        return EProp(
            readout_decay=self._decay(structure),
            strict=self.strict,
            trace_dtype=self.trace_dtype,
            check_finite=self.check_finite,
            prepared_structure=structure,
        )

    @property
    def defines_output_tangent(self) -> bool:
        return True

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> CellStructure:
        """The diagonal structure with the owners of the ops' inputs (to check that the layer is
        feed-forward) and, without `leak`, the cell's constant leak."""
        structure = super().cell_structure(cell, state, x)
        owners = input_owners(cell, state, x, structure)
        leak = None if self.leak is not None else constant_leak(cell, state, x, structure)
        return dataclasses.replace(structure, input_owners=owners, constant_leak=leak)

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        owners = structure.input_owners
        assert owners is not None  # `cell_structure` analyses them
        for site, own, shared in zip(structure.sites, owners.owners, owners.shared):
            if site.traced and (shared or np.any(own >= 0)):
                raise StructureError(
                    f"OTPE cannot trace the op `{site.name}` of {structure.cell_name}: its "
                    "input depends on the neurons' state (recurrent weights), and OTPE is "
                    "defined for feed-forward layers (its estimate of the next layer's "
                    "membrane ignores recurrence). Use `eqtrace.DRTRL()`, `eqtrace.EProp()` or "
                    "`eqtrace.OTTT()` for recurrent layers."
                )
        if self.leak is None:
            leak = structure.constant_leak
            assert leak is not None
            problems = list(leak.problems)
            if not problems and leak.leak is not None and np.size(leak.leak) != 1:
                problems.append(f"it has {structure.num_leaves} state leaves, so no single leak")
            if problems:
                listed = "\n".join(f"  - {p}" for p in problems)
                raise StructureError(
                    f"OTPE cannot read the membrane leak λ of {structure.cell_name} from its "
                    f"code: it needs one constant leak for every neuron, but\n{listed}\nGive it: "
                    "`eqtrace.OTPE(leak=math.exp(-dt / tau_mem))` (the paper's LIF "
                    "differentiates its reset), or detach the reset "
                    "(`eqtrace.nn.LIF(..., detach_reset=True)`) of a LIF without a synapse."
                )
        if self.approximate and structure.params:
            paths = [p.path for p in structure.params]
            raise StructureError(
                f"OTPE(approximate=True) cannot trace {paths} of {structure.cell_name}: they "
                "are parameters outside the synaptic ops, and approximate OTPE's trace is the "
                "ops' inputs filtered by λ, which has nothing for them. Use "
                "`eqtrace.OTPE(leak=...)` (approximate=False), whose traces cover every "
                "parameter, or make them constants (e.g. `LIF(..., learn_tau=False)`)."
            )
        try:
            self._eprop(structure).refuse(cell, structure, state)
        except StructureError as error:
            raise StructureError(
                f"OTPE keeps e-prop's filtered traces (with κ = λ) on every layer, and {error}"
            ) from error

    def cell_notes(self, cell: AbstractCell, state: State, x: ExampleInput) -> tuple[str, ...]:
        structure = self.cell_structure(cell, state, x)
        if self.leak is None:
            leak = structure.constant_leak
            if leak is None or leak.problems or leak.leak is None or np.size(leak.leak) != 1:
                return ()
        lam = self._decay(structure)
        if self.approximate:
            return (
                f"OTPE (approximate): the ops' inputs filtered twice by λ = {lam:.4g}, times "
                "the leaky average of the surrogate derivatives, which is also the credit to "
                "the layer below.",
            )
        return (
            f"OTPE: traces filtered by λ = {lam:.4g}, and the leaky average "
            "of the surrogate derivatives as the credit to the layer below.",
        )

    def trace_neuron_axes(self, structure: CellStructure, site_axes, trace: OTPETrace) -> Any:
        """e-prop's axes for the filtered traces (none for approximate OTPE's input traces,
        which are shared by the neurons); the surrogates' leaky sums along their (neuron)
        output axis; none for the normaliser."""
        filtered = None
        if not self.approximate:
            eprop = self._eprop(structure)
            filtered = eprop.trace_neuron_axes(structure, site_axes, trace.filtered)

        def axis(path, leaf):
            del leaf
            field = path[0].name
            if field == "filtered":
                return None if filtered is None else axis_at(filtered, path[1:])
            if field == "surrogates":
                return 0
            return None

        return jtu.tree_map_with_path(axis, trace)

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> OTPETrace:
        structure = self.required_structure(cell, state, x)
        if self.approximate:
            sites = structure.site_modules(cell)
            filtered = OTPEInputTraces(
                inputs=tuple(
                    jnp.zeros((2, *site.input_shape), op_dtype(op)) if site.traced else None
                    for site, op in zip(structure.sites, sites)
                ),
                biases=tuple(
                    jnp.zeros((2,), op_dtype(op))
                    if site.traced and algebra(op).bias(op) is not None
                    else None
                    for site, op in zip(structure.sites, sites)
                ),
            )
        else:
            filtered = self._eprop(structure).init_cell_trace(cell, state, x)
        return OTPETrace(
            filtered=filtered,
            surrogates=tuple(
                jnp.zeros(site.output_shape, op_dtype(op)) if site.traced else None
                for site, op in zip(structure.sites, structure.site_modules(cell))
            ),
            normaliser=jnp.zeros((), jnp.promote_types(state_dtype(state), jnp.float32)),
        )

    def _sensitivities(self, cell: AbstractCell, state: State, x: Input) -> list[jax.Array]:
        """`∂y_t/∂u` for the output `u` of each call (output-shaped): one VJP of the output
        in probes added to the ops' outputs, as each output element reaches one neuron."""
        structure = self.prepared()
        probes = [
            jnp.zeros(site.output_shape, op_dtype(op))
            for site, op in zip(structure.sites, structure.site_modules(cell))
        ]

        def output(probes):
            new_state, _ = probed_call(cell, state, x, probes, cut=True, sites=structure.site_ops)
            return cell.output(new_state)

        y, pullback = jax.vjp(output, probes)
        (sensitivities,) = pullback(jnp.ones_like(y))
        return sensitivities

    def cell_step(
        self, cell: AbstractCell, state: State, trace: OTPETrace, x: Input
    ) -> tuple[State, OTPETrace]:
        structure = self.prepared()
        lam = self._decay(structure)
        if self.approximate:
            assert isinstance(trace.filtered, OTPEInputTraces)
            new_state, filtered = self._step_inputs(cell, state, trace.filtered, x, lam)
        else:
            new_state, filtered = self._eprop(structure).cell_step(cell, state, trace.filtered, x)
        sensitivities = self._sensitivities(cell, state, x)
        surrogates = tuple(
            None if s is None else (lam * s + d.astype(s.dtype)).astype(s.dtype)
            for s, d in zip(trace.surrogates, sensitivities)
        )
        return new_state, OTPETrace(
            filtered=filtered, surrogates=surrogates, normaliser=lam * trace.normaliser + 1
        )

    def _step_inputs(
        self, cell: AbstractCell, state: State, traces: OTPEInputTraces, x: Input, lam: float
    ) -> tuple[State, OTPEInputTraces]:
        """The step, and approximate OTPE's input traces: each op's input (and a bias's
        constant 1) filtered once and twice by `λ`."""
        structure = self.prepared()
        new_state, records = probed_call(cell, state, x, cut=False, sites=structure.site_ops)
        inputs, biases = [], []
        for (a, _), filtered, bias in zip(records, traces.inputs, traces.biases):
            if filtered is None:  # A read-out call (refused): no trace.
                inputs.append(None)
                biases.append(None)
                continue
            once = lam * filtered[0] + a.astype(filtered.dtype)
            inputs.append(jnp.stack([once, lam * filtered[1] + once]).astype(filtered.dtype))
            if bias is None:
                biases.append(None)
            else:
                once_b = lam * bias[0] + 1
                biases.append(jnp.stack([once_b, lam * bias[1] + once_b]).astype(bias.dtype))
        return new_state, OTPEInputTraces(inputs=tuple(inputs), biases=tuple(biases))

    def _op_changes(
        self, cell: AbstractCell, traces: OTPEInputTraces, params_tangent: Any, row: int
    ) -> list[jax.Array | None]:
        """Per call, the change of the op's output for the weight tangent `δW` on the input
        trace `row` (0: `â`, 1: `ẑ`), `δW â + δb b̂`, through the op's own code (its mask
        included); `None` for calls without a trace."""
        structure = self.prepared()
        op_tangents, _ = structure.split_tangent(params_tangent)
        changes = []
        for op, filtered, bias, delta in zip(
            structure.site_modules(cell), traces.inputs, traces.biases, op_tangents
        ):
            if filtered is None:
                changes.append(None)
                continue
            rules = algebra(op)
            bias_tangent = rules.bias(delta)
            if bias_tangent is not None and bias is not None:
                scaled = bias_tangent * bias[row].astype(bias_tangent.dtype)
                delta = eqx.tree_at(rules.bias, delta, scaled)
            apply = functools.partial(rules.apply, a=filtered[row])
            changes.append(eqx.filter_jvp(apply, (op,), (delta,))[1])
        return changes

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: OTPETrace, x: Input, params_tangent: Any
    ) -> State:
        structure = self.prepared()
        if not self.approximate:
            # The state's derivative is D-RTRL's; the filter enters the output's only.
            eprop = self._eprop(structure)
            return eprop.cell_tangent(cell, state, trace.filtered, x, params_tangent)
        # `∂h_t/∂u_t · (δW â_t)`: the ops' outputs changed as the once-filtered inputs say,
        # pushed through the step's element-wise part (D-RTRL's when the leak is `λ`).
        assert isinstance(trace.filtered, OTPEInputTraces)
        changes = self._op_changes(cell, trace.filtered, params_tangent, 0)
        probes = [
            jnp.zeros(site.output_shape, op_dtype(op))
            for site, op in zip(structure.sites, structure.site_modules(cell))
        ]
        tangents = [p if c is None else c.astype(p.dtype) for p, c in zip(probes, changes)]

        def step(probes):
            return probed_call(cell, state, x, probes, cut=True, sites=structure.site_ops)[0]

        return jax.jvp(step, (probes,), (tangents,))[1]

    def cell_output_tangent(
        self, cell: AbstractCell, state: State, trace: OTPETrace, x: Input, params_tangent: Any
    ) -> jax.Array:
        """`\\hat R_t · δθ` (approximate: `\\bar g_t ⊙ (δW \\hat z_t)`), shaped like the
        cell's output."""
        structure = self.prepared()
        if not self.approximate:
            eprop = self._eprop(structure)
            return eprop.cell_output_tangent(cell, state, trace.filtered, x, params_tangent)
        assert isinstance(trace.filtered, OTPEInputTraces)
        changes = self._op_changes(cell, trace.filtered, params_tangent, 1)
        zero = jnp.zeros(structure.num_neurons, state_dtype(state))
        total = _averaged(structure, trace, changes, zero)
        return total.reshape(structure.neuron_shape)

    def cell_output_input_tangent(
        self, cell: AbstractCell, state: State, trace: OTPETrace, x: Input, x_tangent: Any
    ) -> jax.Array:
        """`Σ_o ḡ_t[o] ⊙ (∂u_o/∂x · δx)` over the ops' outputs, plus the exact derivative
        through any path from the input that bypasses the ops."""
        structure = self.prepared()
        sites = structure.site_ops
        diff_x, static_x = eqx.partition(x, eqx.is_inexact_array)
        _, records = probed_call(cell, state, x, cut=False, sites=sites)
        recorded = [u for _, u in records]

        def through(dx):
            x = eqx.combine(dx, static_x)
            _, records = probed_call(cell, state, x, cut=False, sites=sites)
            # The ops' outputs replayed: what reaches the output from `x` outside the ops.
            bypass, _ = probed_call(cell, state, x, cut=False, outputs=recorded, sites=sites)
            return cell.output(bypass), [u for _, u in records]

        bypass, changes = exact_tangent(through, diff_x, x_tangent)
        return _averaged(structure, trace, changes, jnp.ravel(bypass)).reshape(bypass.shape)


def _averaged(structure: CellStructure, trace: OTPETrace, changes: list, total: jax.Array):
    """`total + Σ_o ḡ_t[o] ⊙ du_o` over the calls with a surrogate sum, `ḡ_t` the leaky
    average of the surrogate derivatives (the sum over its normaliser), in `total`'s dtype."""
    for i, (summed, du) in enumerate(zip(trace.surrogates, changes)):
        if summed is None or du is None:
            continue
        mean = (summed / trace.normaliser.astype(summed.dtype)).astype(du.dtype)
        total = total + from_outputs(structure, mean * du, i).astype(total.dtype)
    return total
