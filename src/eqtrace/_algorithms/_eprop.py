"""e-prop: D-RTRL's eligibility traces, filtered by the leaky read-out that reads the layer."""

import abc
import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar

from .. import _reach
from .._algorithm import AbstractAlgorithm
from .._batch_sum import contract_op
from .._cell import AbstractCell
from .._consumer import consumer_leak
from .._custom_types import ExampleInput, Input, State
from .._link import AbstractDerivative, freeze, input_tangent, link
from .._sparsity import identity_colours, pullback_pattern
from .._structure import CellStructure, StructureError
from ._diagonal import (
    AbstractDiagonalAlgorithm,
    Linearisation,
    axis_at,
    block_param_traces,
    flat_leaves,
    from_outputs,
    linearise_block,
    mix,
    op_dtype,
    state_dtype,
    to_outputs,
    transition_products,
)
from ._drtrl import DRTRL, AbstractWeightTraceAlgorithm, block_weight_traces


def _filter(kappa, spread, eps, filtered):
    """`κ ē + Σ_k s[..., k] ⊙ ε[..., k]` for one weight-shaped trace. The sum over the few
    state leaves is written out: as a reduction over the trailing axis, XLA:CPU gives it to a
    library kernel that is many times slower than the element-wise pass it fuses into."""
    eps = eps.astype(spread.dtype)
    summed = spread[..., 0] * eps[..., 0]
    for k in range(1, eps.shape[-1]):
        summed = summed + spread[..., k] * eps[..., k]
    return (kappa * filtered + summed).astype(filtered.dtype)


class EPropTrace(eqx.Module):
    """e-prop's trace: D-RTRL's eligibility traces (`eligibility`, a `DRTRLTrace`), and their
    κ-filtered copies in the space of the cell's output, one value per weight and neuron:
    per call of a synaptic op, shaped like the op's parameters (`None` for read-out calls);
    per other parameter, shaped like it (per-neuron) or `(N, |p|)` (small shared). Both
    `ops` and `params` are `None` when the cell has no leaky read-out (no filter)."""

    eligibility: Any  # a `DRTRLTrace`, or the filtered rule's trace (`SnAp1Trace`)
    ops: tuple[Any, ...] | None
    params: tuple[jax.Array | None, ...] | None


class AbstractFiltered(AbstractDiagonalAlgorithm[EPropTrace]):
    """A weight-trace rule (`DRTRL`, `SnAp1`) whose traces of a cell's output are filtered by the
    constant leak `κ` of the layer that reads that output (a leaky read-out, a synaptic filter),
    so that its credit reaches the later steps of that layer: e-prop's filter, for any such
    rule. `EProp` (on D-RTRL's traces) and `eqtrace.Filtered` (on any) are its two forms;
    subclasses say which rule's traces they filter (`eligibility_rule`)."""

    readout_decay: AbstractVar[float | None]

    def __check_init__(self):
        if self.readout_decay is not None and not 0 <= self.readout_decay < 1:
            raise ValueError(
                f"{type(self).__name__}: `readout_decay` must be the read-out's κ = "
                f"exp(−dt/τ), in [0, 1), but received {self.readout_decay}."
            )

    @abc.abstractmethod
    def eligibility_rule(self) -> AbstractWeightTraceAlgorithm:
        """The rule whose eligibility traces are filtered, not prepared for a cell."""

    @property
    def _base(self) -> AbstractWeightTraceAlgorithm:
        """The rule whose traces are filtered, prepared for the same cell as this one."""
        rule = self.eligibility_rule()
        if self.prepared_structure is None:
            return rule
        return rule.with_structure(self.prepared_structure)

    @property
    def _unfiltered(self) -> str:
        """How to call the rule without the filter, for the refusals."""
        return f"`eqtrace.{type(self.eligibility_rule()).__name__}()` (unfiltered)"

    @property
    def defines_output_tangent(self) -> bool:
        return self.readout_decay is not None

    def for_layer(self, layer: AbstractCell, consumer: Any) -> "AbstractFiltered":
        """This rule with the filter `κ` of `consumer`, the layer reading `layer`'s output, if
        its leak is a constant `κ` (`eqtrace.nn.LeakyReadout`, a synaptic filter: read from
        its code when the rule is prepared); otherwise the rule unfiltered."""
        if self.readout_decay is not None:
            raise ValueError(
                f"{type(self).__name__}: `readout_decay` (here {self.readout_decay}) is for a "
                "single cell; in an `eqtrace.nn.Sequential` each cell's filter comes from the "
                "layer after it (an `eqtrace.nn.LeakyReadout` or another layer with a constant "
                "leak). Leave `readout_decay` unset for the network."
            )
        leak = consumer_leak(layer, consumer).leak
        if leak is not None:
            return dataclasses.replace(self, readout_decay=leak)
        return self

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> CellStructure:
        # The filtered rule's own structure (SnAp-1's carries its input owners).
        return self.eligibility_rule().cell_structure(cell, state, x)

    def trace_neuron_axes(self, structure: CellStructure, site_axes, trace: EPropTrace) -> Any:
        """D-RTRL's axes for the eligibility traces; the filtered copies, shaped like the op's
        weights (split like them) or like a parameter (`(*neuron_shape)` or `(N, |p|)`),
        along their neurons."""
        eligibility = self._base.trace_neuron_axes(structure, site_axes, trace.eligibility)

        def axis(path, leaf):
            del leaf
            field = path[0].name
            if field == "eligibility":
                return axis_at(eligibility, path[1:])
            if field == "ops":
                return axis_at(site_axes[path[1].idx], path[2:])
            return 0

        return jtu.tree_map_with_path(axis, trace)

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        for site in structure.sites:
            if site.traced and not site.linear_in_weights:
                raise StructureError(
                    f"{type(self).__name__} cannot trace the op `{site.name}` "
                    f"({structure.ops[site.op].type_name}) of {structure.cell_name}: its output "
                    "is not linear in its weights (e.g. `softplus(raw) @ a`), which the "
                    "eligibility trace assumes. Hold the transformed weights as the op's "
                    "array, or use `eqtrace.PPProp(...)`, which differentiates the op itself."
                )
        # The filtered rule's own refusals (SnAp-1's input elements shared by neurons).
        self._base.refuse(cell, structure, state)
        if self.readout_decay is None:
            return
        acting_on_output = [s.name for s in structure.sites if not s.traced]
        acting_on_output += [p.path for p in structure.params if p.kind == "readout"]
        if acting_on_output:
            raise StructureError(
                f"{type(self).__name__} cannot filter the output of {structure.cell_name} for "
                f"its leaky read-out: {acting_on_output} act on the output but not on the "
                "state, so their effect on later outputs is not in the eligibility traces. "
                f"Move them into the read-out, or use {self._unfiltered}."
            )
        # A parameter read by `output` as well as by the state update (a threshold in the
        # spike and in the reset): the filter covers its path through the state only.
        in_both = [p.path for p in structure.params if p.kind != "readout" and p.read_by_output]
        if in_both:
            raise StructureError(
                f"{type(self).__name__} cannot filter the output of {structure.cell_name} for "
                f"its leaky read-out: {in_both} act on the output directly as well as through "
                "the state, and the filter of the eligibility traces covers the path through "
                "the state only. Read the parameter in the state update alone (store what "
                f"`output` needs in the state), or use {self._unfiltered}."
            )
        problem = _output_problem(cell, structure, state)
        if problem is not None:
            raise StructureError(
                f"{type(self).__name__} cannot filter the output of {structure.cell_name} for "
                f"its leaky read-out: {problem}. e-prop filters the output's traces per "
                f"neuron; use {self._unfiltered}, or make `output` one value per neuron."
            )

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> EPropTrace:
        structure = self.required_structure(cell, state, x)
        eligibility = self._base.init_cell_trace(cell, state, x)
        if self.readout_decay is None:
            return EPropTrace(eligibility=eligibility, ops=None, params=None)
        n = structure.num_neurons
        ops = tuple(
            None if eps is None else jtu.tree_map(lambda w: jnp.zeros(w.shape[:-1], w.dtype), eps)
            for eps in eligibility.ops
        )
        params = tuple(
            None
            if eps is None
            else jnp.zeros((n, eps.shape[-1]) if p.kind == "shared" else p.shape, eps.dtype)
            for p, eps in zip(structure.params, eligibility.params)
        )
        return EPropTrace(eligibility=eligibility, ops=ops, params=params)

    def cell_step(
        self, cell: AbstractCell, state: State, trace: EPropTrace, x: Input
    ) -> tuple[State, EPropTrace]:
        new_state, eligibility = self._base.cell_step(cell, state, trace.eligibility, x)
        if self.readout_decay is None:
            return new_state, EPropTrace(eligibility=eligibility, ops=None, params=None)
        kappa = self.readout_decay
        structure = self.prepared()
        _, d_output = _output_sensitivity(cell, new_state)
        ops = []
        for i, (op, site, eps, filtered) in enumerate(
            zip(structure.site_modules(cell), structure.sites, eligibility.ops, trace.ops)
        ):
            if eps is None:
                ops.append(None)
                continue
            a = jnp.zeros(site.input_shape, op_dtype(op))  # Its shape only.
            # `Σ_k B(∂z/∂h^k) ⊙ ε[..., k]`: the output's eligibility trace, weight-shaped.
            spread = _reach.spread(
                op, site.reach, a, jnp.moveaxis(to_outputs(structure, d_output, i), 0, -1)
            )
            ops.append(jtu.tree_map(functools.partial(_filter, kappa), spread, eps, filtered))
        params = []
        for p, eps, filtered in zip(structure.params, eligibility.params, trace.params):
            if eps is None:
                params.append(None)
            elif p.kind == "shared":  # `(K, N, |p|)`
                params.append(kappa * filtered + jnp.sum(d_output[..., None] * eps, axis=0))
            else:  # `(K, *neuron_shape)`
                d = d_output.reshape(eps.shape)
                params.append(kappa * filtered + jnp.sum(d * eps, axis=0))
        return new_state, EPropTrace(eligibility=eligibility, ops=tuple(ops), params=tuple(params))

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: EPropTrace, x: Input, params_tangent: Any
    ) -> State:
        # The state's derivative is D-RTRL's; the filter only enters the output's.
        return self._base.cell_tangent(cell, state, trace.eligibility, x, params_tangent)

    def cell_output_tangent(
        self, cell: AbstractCell, state: State, trace: EPropTrace, x: Input, params_tangent: Any
    ) -> jax.Array:
        """`\\bar e_t · δθ`: the filtered traces applied to a parameter tangent, shaped like the
        cell's output."""
        structure = self.prepared()
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        dtype = state_dtype(state)
        total = jnp.zeros(structure.num_neurons, dtype)
        for i, (op, site, filtered, delta) in enumerate(
            zip(structure.site_modules(cell), structure.sites, trace.ops, op_tangents)
        ):
            if filtered is not None:
                a = jnp.zeros(site.input_shape, op_dtype(op))  # Its shape only.
                filtered = jtu.tree_map(lambda f, d: f.astype(d.dtype), filtered, delta)
                if _reach.all_weight_shaped(site.reach):  # One pass over the batch.
                    per_output = contract_op(op, a, filtered, delta)
                else:
                    per_output = _reach.contract(op, site.reach, a, filtered, delta)
                total = total + from_outputs(structure, per_output, i).astype(dtype)
        for p, filtered, delta in zip(structure.params, trace.params, other_tangents):
            if filtered is None:
                continue
            if p.kind == "shared":
                total = total + filtered @ jnp.ravel(delta)
            else:
                total = total + jnp.ravel(filtered * delta)
        return total.reshape(structure.neuron_shape)

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: EPropTrace, xs: Input
    ) -> tuple[State, EPropTrace]:
        """D-RTRL's blocks (one pass over the traces per block), with the filter's block form
        when it is on (see `cell_output_steps`)."""
        if self.readout_decay is not None:
            states, trace, _ = self.cell_output_steps(cell, state, trace, xs)
            return states, trace
        states, eligibility = self._base.cell_steps(cell, state, trace.eligibility, xs)
        return states, EPropTrace(eligibility=eligibility, ops=None, params=None)

    def cell_output_steps(
        self, cell: AbstractCell, state: State, trace: EPropTrace, xs: Input
    ) -> tuple[State, EPropTrace, Any]:
        """`C` steps with the filter, reading and writing the weight-shaped traces once per
        block. With D-RTRL's unrolled traces `ε_t = Φ(t, 0) ε_0 + Σ_{τ≤t} Φ(t, τ) I_τ`, the
        filtered trace after the block is

        $$
        \\bar e_C = κ^C \\bar e_0 + \\sum_{t=1}^{C} w_t\\, ε_t
        = κ^C \\bar e_0 + g_0\\, ε_0 + \\sum_{τ=1}^{C} g_τ I_τ,\\qquad
        w_t = κ^{C−t}\\, \\frac{∂z_t}{∂h_t},
        $$

        with the per-neuron rows `g_τ = Σ_{t≥τ} w_t Φ(t, τ)` from the reverse recursion
        `g_τ = w_τ + g_{τ+1} D_{τ+1}`, `g_0 = g_1 D_1`: D-RTRL's block sum with other
        coefficients, one matrix product per op. The outputs' derivative,
        `\\bar e_t · δθ = κ^t\\, \\bar e_0 · δθ + Σ_{s≤t} κ^{t−s} (∂z_s/∂h_s)(ε_s · δθ)`,
        is state-sized, from D-RTRL's block tangents `ε_s · δθ`.

        **Returns:** the states and the outputs of the block's steps, stacked, and the last
        trace; the values and derivatives of `C` single steps up to round-off.
        """
        length = jtu.tree_leaves(xs)[0].shape[0]
        if self.readout_decay is None or length == 1:
            # A single step is cheaper stepped: its output's derivative reads `ē_1` only,
            # where the block form reads `ε_0` and `ē_0`.
            return AbstractAlgorithm.cell_output_steps(self, cell, state, trace, xs)
        kappa = self.readout_decay
        structure = self.prepared()
        params, static, frozen, (state, trace, stopped_xs) = freeze(cell, state, trace, xs)
        lins, previous = linearise_block(
            frozen, structure, state, stopped_xs, self._base.restriction(structure)
        )
        products, first = transition_products(lins.jacobian)
        eligibility = trace.eligibility
        new_eligibility = self._base.trace_type(
            ops=block_weight_traces(structure, frozen, lins, products, first, eligibility.ops),
            params=block_param_traces(structure, products, first, lins, eligibility.params),
        )
        ys, d_output = jax.vmap(lambda h: _output_sensitivity(frozen, h))(lins.new_state)
        weights = jnp.asarray(_powers(kappa, length - 1 - np.arange(length), d_output.dtype))
        rows, row_0 = _filter_rows(weights[:, None, None] * d_output, lins.jacobian)
        rows, row_0 = rows[:, None], row_0[None]  # one row of coefficients
        decayed = jnp.asarray(_powers(kappa, length, d_output.dtype))  # `κ^C`
        old_ops, old_params = trace.ops, trace.params
        assert old_ops is not None and old_params is not None  # The filter is on.
        new_ops = block_weight_traces(structure, frozen, lins, rows, row_0, eligibility.ops)
        ops = tuple(
            None
            if new is None
            else jtu.tree_map(lambda n, f: (decayed * f + n[..., 0]).astype(f.dtype), new, old)
            for new, old in zip(new_ops, old_ops)
        )
        new_params = block_param_traces(structure, rows, row_0, lins, eligibility.params)
        params_filtered = tuple(
            None if new is None or old is None else (decayed * old + new[0]).astype(old.dtype)
            for new, old in zip(new_params, old_params)
        )
        states, new_trace = self.checked(
            lins.new_state,
            EPropTrace(eligibility=new_eligibility, ops=ops, params=params_filtered),
        )
        derivative = _FilteredBlockDerivative(
            algorithm=self,
            state=state,
            trace=trace,
            lins=lins,
            previous=previous,
            d_output=d_output,
            outputs=ys,
        )
        states_link, ys_link = link(params, xs, static=static, derivative=derivative)
        return (
            jtu.tree_map(jnp.add, states, states_link),
            new_trace,
            jtu.tree_map(jnp.add, ys, ys_link),
        )


class EProp(AbstractFiltered):
    """e-prop (Bellec et al., "A solution to the learning dilemma for recurrent networks of
    spiking neurons", *Nature Communications* 11, 3625, 2020).

    The eligibility traces are D-RTRL's per-neuron ones, `e_t = dz_t/dθ` along the paths
    within each neuron (for LIF and ALIF neurons they are the paper's eligibility traces). What
    e-prop adds is the read-out's leak. A leaky read-out
    `y_t = κ y_{t-1} + (1 − κ)(W_{out} z_t + b)` (`eqtrace.nn.LeakyReadout`) carries a spike's
    effect into all later outputs, `dy_t/dθ = Σ_{s≤t} κ^{t−s}(1 − κ) W_{out}\\, dz_s/dθ`, so
    e-prop folds that filter into the trace:

    $$
    ∇θ = \\sum_t L_t \\cdot \\bar e_t,\\qquad \\bar e_t = κ\\,\\bar e_{t-1} + e_t,\\qquad
    L_t = (1 − κ)\\,W_{out}^⊤\\, \\frac{∂L_t}{∂y_t},
    $$

    with `L_t` the learning signal, which `jax.grad` computes: the read-out's own online step
    sends `(1 − κ) W_{out}^⊤ ∂L_t/∂y_t` to its input (or `Bᵀ` with
    `eqtrace.nn.RandomFeedback`: random e-prop). Per-layer D-RTRL contracts `L_t` with the
    unfiltered `e_t` and so drops the leak.

    In an `eqtrace.nn.Sequential`, each cell whose output feeds an `eqtrace.nn.LeakyReadout`
    gets the filter, with that read-out's `κ`; every other cell (the read-out itself, a cell
    under a stateless read-out or under another cell) runs exactly as `eqtrace.DRTRL`. The
    filter acts on the cell's output `z_t = output(h_t)`, `\\bar e_t = κ \\bar e_{t-1} +
    (∂z_t/∂h_t)\\, ε_t` with `ε_t` D-RTRL's state trace; this needs `output` to give one value
    per neuron from that neuron's state (spikes from the membrane, `s_t = H(v_t)`, or a state
    leaf), which is checked, and no parameter acting on the output alone.

    It is exact (equal to BPTT) for a feed-forward layer with element-wise recurrence (LIF or
    ALIF without recurrent weights, a rate cell such as `MinGRUCell`) under a leaky read-out;
    with recurrent weights it drops, as D-RTRL does, the paths through other neurons. Memory
    per sample: D-RTRL's `K·|θ|` plus `|θ|` for the filtered copy (`K` state leaves). Blocks
    (`steps`, `eqtrace.make_online_block`) read and write the traces once per block, as
    D-RTRL's do, with the filter or without it (see `cell_output_steps`).

    **Arguments:**

    - `readout_decay`: `κ` of a leaky read-out of this cell's output, for a single cell whose
      read-out you apply yourself. Leave it `None` for an `eqtrace.nn.Sequential`: there each
      cell's `κ` comes from the layer after it.
    - `strict`, `trace_dtype`, `check_finite`: as for `eqtrace.DRTRL`.
    """

    readout_decay: float | None = None
    strict: bool = True
    trace_dtype: Any = None
    check_finite: bool = False

    def eligibility_rule(self) -> DRTRL:
        return DRTRL(
            strict=self.strict, trace_dtype=self.trace_dtype, check_finite=self.check_finite
        )


class _FilteredBlockDerivative(AbstractDerivative):
    """A block's states and outputs as e-prop differentiates them under a leaky read-out: the
    states by D-RTRL's `ε_t · δθ` (`block_tangent`, without forming `ε_t`), the outputs by
    the filtered traces, `ē_t · δθ = κ^t ē_0 · δθ + Σ_{s≤t} κ^{t−s} (∂z_s/∂h_s)
    (ε_s · δθ)`; and both exactly with respect to each step's input."""

    algorithm: AbstractFiltered
    state: State  # `h_0`, before the block
    trace: EPropTrace  # `ε_0` and `ē_0`
    lins: Linearisation
    previous: State  # `h_0 … h_{C-1}`, stacked
    d_output: jax.Array  # `(C, K, N)`: `∂z_t/∂h_t`
    outputs: jax.Array  # `z_1 … z_C`, for their shape

    @property
    def like(self) -> tuple[State, jax.Array]:
        return self.lins.new_state, self.outputs

    def of_params(self, cell, xs, params_tangent):
        del xs  # The tangents of a prepared rule do not read the inputs.
        algorithm, kappa = self.algorithm, self.algorithm.readout_decay
        assert kappa is not None
        zs = algorithm._base.block_tangent(
            cell, self.state, self.trace.eligibility, self.lins, params_tangent
        )  # (C, K, N)
        start = algorithm.cell_output_tangent(cell, self.state, self.trace, None, params_tangent)
        length = zs.shape[0]
        steps = np.arange(length)
        # `κ^{t−s}` for `s ≤ t`: a small lower-triangular matrix over the block's steps.
        lags = steps[:, None] - steps[None, :]
        decay = np.where(lags >= 0, kappa ** np.maximum(lags, 0), 0.0).astype(zs.dtype)
        per_step = jnp.sum(self.d_output.astype(zs.dtype) * zs, axis=1)  # (C, N)
        ys = (
            jnp.asarray(decay) @ per_step
            + _powers(kappa, steps + 1, zs.dtype)[:, None] * jnp.ravel(start)[None]
        )
        leaves, treedef = jtu.tree_flatten(self.lins.new_state)
        states = jtu.tree_unflatten(
            treedef,
            [zs[:, k].reshape(leaf.shape).astype(leaf.dtype) for k, leaf in enumerate(leaves)],
        )
        return states, ys.reshape(self.outputs.shape).astype(self.outputs.dtype)

    def of_input(self, cell, xs, xs_tangent):
        states = jax.vmap(lambda h, x, t: input_tangent(cell, h, x, t))(
            self.previous, xs, xs_tangent
        )
        ys = jax.vmap(lambda h, t: jax.jvp(cell.output, (h,), (t,))[1])(self.lins.new_state, states)
        return states, ys


def _output_sensitivity(cell: AbstractCell, new_state: State) -> tuple[jax.Array, jax.Array]:
    """The output `z` at `new_state` and `∂z_n/∂h^k_n`, `(K, N)`: one VJP, as `output` acts
    per neuron (checked)."""
    z, pullback = jax.vjp(cell.output, new_state)
    (d_output,) = pullback(jnp.ones_like(z))
    return z, flat_leaves(d_output)


def _powers(kappa: float, exponents, dtype) -> np.ndarray:
    """`κ^e` for the (non-negative) `exponents`, as a constant."""
    return np.asarray(kappa ** np.asarray(exponents), dtype)


def _filter_rows(weights: jax.Array, jacobians: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From `w_1 … w_C` and `D_1 … D_C` (`(C, K, N)`, `(C, K, K, N)`): the rows
    `g_τ = Σ_{t≥τ} w_t Φ(t, τ)` stacked, by `g_τ = w_τ + g_{τ+1} D_{τ+1}`, and
    `g_0 = g_1 D_1`."""

    def body(carried, inputs):  # `carried` is `g_{τ+1} D_{τ+1}`
        weight, jacobian = inputs
        row = weight + carried
        # `(g D)[m] = Σ_k g[k] D[k, m]`, per neuron.
        return mix(jnp.swapaxes(jacobian, 0, 1), row), row

    row_0, rows = jax.lax.scan(body, jnp.zeros_like(weights[0]), (weights, jacobians), reverse=True)
    return rows, row_0


def _output_problem(cell: AbstractCell, structure: CellStructure, state: State) -> str | None:
    """Why `cell.output` is not one value per neuron from that neuron's state, or `None`; read
    from the code of `output`: leaf `k` of neuron `n` may reach output `n` only."""
    output = jax.eval_shape(cell.output, state)
    if not isinstance(output, jax.ShapeDtypeStruct) or output.shape != structure.neuron_shape:
        return f"its output is {output}, not one array of the neuron shape {structure.neuron_shape}"

    def read(s, cell):
        return cell.output(s)

    with jax.ensure_compile_time_eval():
        pattern = pullback_pattern(read, (state, cell), (0,), identity_colours, known=(1,))
    n = structure.num_neurons
    for k, leaf in enumerate(pattern.leaves[0]):
        if np.any(leaf.reshape(n, n) & ~np.eye(n, dtype=bool)):
            return (
                f"its output mixes neurons' `{structure.state_paths[k]}` (e.g. a sum or a "
                "matmul in `output`)"
            )
    return None
