"""D-RTRL: diagonal RTRL with weight-shaped traces, stepped or in blocks; and what it shares
with SnAp-1, whose traces move by another per-neuron Jacobian."""

import abc
import functools
from typing import Any, ClassVar, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractClassVar, AbstractVar

from .. import _reach
from .._batch_sum import contract_op
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._link import AbstractDerivative, freeze, input_tangent, link
from .._ops import algebra
from .._structure import CellStructure, StructureError
from ._diagonal import (
    AbstractDiagonalAlgorithm,
    Linearisation,
    block_param_traces,
    flat_leaves,
    from_outputs,
    init_param_traces,
    linearise,
    linearise_block,
    mix,
    op_dtype,
    param_tangents,
    state_dtype,
    step_param_traces,
    to_outputs,
    transition_products,
    unflatten_like,
)


_Trace = TypeVar("_Trace")

#: Blocks of at most this many steps add their immediate terms to the weight-shaped traces as
#: rank-one updates, which XLA fuses with the carried term into one element-wise pass that
#: writes the new trace; longer blocks take one matrix product over the steps per op. A
#: product whose contraction is only a few steps deep is inefficient, and it writes a
#: trace-sized result in its own layout (`(in, out)` per sample), which a second pass reads
#: transposed: on MNIST-1D (GRU 1→128, batch 100, blocks of 10) the two cost 3× the ten
#: steps they replace (benchmarks/README.md, "Profile").
UNROLLED_BLOCK = 16


def _propagate(spread_jacobian, trace, immediate):
    """`ε[…, k] ← Σ_m B(D[k, m]) ⊙ ε[…, m] + VJP_W(∂h^k/∂u)` for one parameter array, computed
    in the immediate term's dtype and stored in the trace's."""
    mixed = mix(spread_jacobian, trace.astype(immediate.dtype), leaf_axis=-1)
    return (immediate + mixed).astype(trace.dtype)


def block_weight_traces(
    structure: CellStructure,
    cell: AbstractCell,
    lins: Linearisation,
    per_step: jax.Array,
    carried: jax.Array,
    traces: tuple[Any, ...],
) -> tuple[Any, ...]:
    """Per call site, the weight-shaped sums over a block of `C` steps

    $$
    \\sum_m c[r, m] ⊙ ε_0[m] + \\sum_{τ=1}^{C} \\sum_m p_τ[r, m] ⊙ I_τ[m]
    $$

    for `R` rows `r` of per-neuron coefficients, `per_step` `p` `(C, R, K, N)` and `carried`
    `c` `(R, K, N)`, with `I_τ[m] = VJP_W(∂h^m_τ/∂u)` the immediate terms and `ε_0` the
    traces before the block (`None` for read-out calls, kept). D-RTRL's new traces are the
    `R = K` rows of the transition products, `p_τ = Φ(C, τ)` and `c = Φ(C, 0)`; a linear
    functional of the block's traces (e-prop's filter) is one row. Each leaf is `(*W, R)`, in
    the dtype of `ε_0`; the sum over `τ` is one matrix product per op (for blocks of more than
    `UNROLLED_BLOCK` steps; shorter ones add `C` rank-one terms in the same element-wise pass
    as the carried term), and `ε_0` is read once.
    """
    new = []
    for i, (op, eps) in enumerate(zip(structure.site_modules(cell), traces)):
        if eps is None:  # A read-out op: exact gradient through `output`, no trace.
            new.append(None)
            continue
        reach, inputs = structure.sites[i].reach, lins.op_inputs[i]
        coefficients = to_outputs(structure, per_step, i)  # (C, R, K, *u)
        sensitivities = lins.op_sensitivities[i]  # (C, K, *u)
        immediate = sum(
            coefficients[:, :, m] * sensitivities[:, m, None] for m in range(sensitivities.shape[1])
        )  # (C, R, *u): Σ_m p_τ[r, m] ∂h^m_τ/∂u_τ
        immediate = jnp.moveaxis(immediate, 1, -1)
        first = jnp.moveaxis(to_outputs(structure, carried, i), (0, 1), (-2, -1))
        if inputs.shape[0] <= UNROLLED_BLOCK:
            summed = functools.reduce(
                lambda x, y: jtu.tree_map(jnp.add, x, y),
                (_reach.outer(op, reach, inputs[t], immediate[t]) for t in range(inputs.shape[0])),
            )
        else:
            summed = _reach.outer_sum(op, reach, inputs, immediate)
        spread = _reach.spread(op, reach, inputs[0], first)
        new.append(jtu.tree_map(_propagate, spread, eps, summed))
    return tuple(new)


class DRTRLTrace(eqx.Module):
    """D-RTRL's trace: per call of a synaptic op in a step, the op's parameters' traces for
    all state leaves, shaped `(*W.shape, K)` (`None` for calls that do not reach the state,
    i.e. read-outs); per other parameter, its element-wise (or dense) trace (`None` if it does
    not reach the state).

    An op called twice has a trace per call: the calls may reach different neurons, and the
    rule's weight gradient is the sum over the calls."""

    ops: tuple[Any, ...]
    params: tuple[jax.Array | None, ...]


class AbstractWeightTraceAlgorithm(AbstractDiagonalAlgorithm[_Trace]):
    """A diagonal rule with D-RTRL's weight-shaped traces (`DRTRL`, `SnAp1`). The rules differ
    only in the per-neuron Jacobian `D_t` that carries the traces from step to step, which
    `restriction` chooses; the immediate term, the gradient and the blocks are the same."""

    trace_dtype: AbstractVar[Any]
    #: The trace's class, built from its `ops` and `params`.
    trace_type: AbstractClassVar[type]

    @abc.abstractmethod
    def restriction(self, structure: CellStructure) -> tuple[Any, ...] | None:
        """Per call site, `None` or the map `(op, a, δa) -> δu` through which the op's input
        still reaches its output in `D_t`; `None` for every op's input cut (D-RTRL)."""

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        del cell, state
        for site in structure.sites:
            if site.traced and not site.linear_in_weights:
                raise StructureError(
                    f"{type(self).__name__} cannot trace the op `{site.name}` "
                    f"({structure.ops[site.op].type_name}) of {structure.cell_name}: its output "
                    "is not linear in its weights (e.g. `softplus(raw) @ a`), which the "
                    "weight-shaped trace assumes. Hold the transformed weights as the op's "
                    "array, or use `eqtrace.PPProp(...)`, which differentiates the op itself."
                )

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> _Trace:
        structure = self.required_structure(cell, state, x)
        k = structure.num_leaves
        ops = tuple(
            _reach.zeros(op, site.reach, k, self.trace_dtype) if site.traced else None
            for op, site in zip(structure.site_modules(cell), structure.sites)
        )
        return self.trace_type(ops=ops, params=init_param_traces(structure, cell))

    def cell_step(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input
    ) -> tuple[State, _Trace]:
        lin, new_trace = self.linearised_step(cell, state, trace, x)
        return lin.new_state, new_trace

    def linearised_step(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input
    ) -> tuple[Linearisation, _Trace]:
        """`cell_step` with the step's linearisation (its `jacobian` is `D_t`, the per-neuron
        Jacobian that carries the trace), for a rule that corrects this one (`LowRankRTRL`)."""
        structure = self.prepared()
        lin = linearise(cell, structure, state, x, restricted=self.restriction(structure))
        new_ops = []
        for i, (op, a, df, eps) in enumerate(
            zip(structure.site_modules(cell), lin.op_inputs, lin.op_sensitivities, trace.ops)
        ):
            if eps is None:  # A read-out op: exact gradient through `output`, no trace.
                new_ops.append(None)
                continue
            reach = structure.sites[i].reach
            d_out = jnp.moveaxis(to_outputs(structure, lin.jacobian, i), (0, 1), (-2, -1))
            propagate = _reach.spread(op, reach, a, d_out)  # leaves (…, K, K)
            immediate = _reach.outer(op, reach, a, jnp.moveaxis(df, 0, -1))  # leaves (…, K)
            new_ops.append(jtu.tree_map(_propagate, propagate, eps, immediate))
        new_params = step_param_traces(structure, lin, trace.params)
        return lin, self.trace_type(ops=tuple(new_ops), params=new_params)

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input, params_tangent: Any
    ) -> State:
        structure = self.prepared()
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        from_params = param_tangents(structure, trace.params, other_tangents, state_dtype(state))
        # One row per state leaf, kept apart: a leaf the loss does not reach gets a symbolic
        # zero cotangent, and JAX then skips reading that leaf's trace in the backward pass.
        rows = []
        for k in range(structure.num_leaves):
            row = from_params[k]
            for i, (op, site, eps, delta) in enumerate(
                zip(structure.site_modules(cell), structure.sites, trace.ops, op_tangents)
            ):
                if eps is not None:
                    a = jnp.zeros(site.input_shape, op_dtype(op))  # Its shape only.
                    if _reach.all_weight_shaped(site.reach):  # One pass over the batch.
                        per_output = contract_op(op, a, eps, delta, leaf=k)
                    else:
                        eps_k = jtu.tree_map(lambda e, d: e[..., k].astype(d.dtype), eps, delta)
                        per_output = _reach.contract(op, site.reach, a, eps_k, delta)
                    row = row + from_outputs(structure, per_output, i)
            rows.append(row)
        return unflatten_like(state, rows)

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: _Trace, xs: Input
    ) -> tuple[State, _Trace]:
        """`C` steps in one pass over the trace. The recursion `ε_t = D_t ε_{t-1} + I_t`
        (`I_t` the immediate term) unrolls over the block to

        $$
        ε_C = Φ(C, 0)\\,ε_0 + \\sum_{τ=1}^{C} Φ(C, τ)\\,I_τ,\\qquad
        Φ(C, τ) = D_C ⋯ D_{τ+1},
        $$

        a K-by-K block per neuron, so the weight-shaped trace is read and written once per
        block and the sum over `τ` is one matrix product per op, instead of `C` memory-bound
        passes. The derivative the rule gives `h_t`, `ε_t · δθ`, is computed without forming
        `ε_t`: a custom JVP rule gives `z_t = ε_t · δθ` by the state-sized recursion
        `z_t = D_t z_{t-1} + I_t · δθ`. Values and gradients equal `C` single steps up to
        round-off.
        """
        structure = self.prepared()
        params, static, frozen, (state, trace, stopped_xs) = freeze(cell, state, trace, xs)
        restricted = self.restriction(structure)
        lins, previous = linearise_block(frozen, structure, state, stopped_xs, restricted)
        products, first = transition_products(lins.jacobian)
        new_ops = block_weight_traces(structure, frozen, lins, products, first, trace.ops)
        new_params = block_param_traces(structure, products, first, lins, trace.params)
        states, new_trace = self.checked(
            lins.new_state, self.trace_type(ops=new_ops, params=new_params)
        )
        derivative = _BlockDerivative(
            algorithm=self, state=state, trace=trace, lins=lins, previous=previous
        )
        return jtu.tree_map(
            jnp.add, states, link(params, xs, static=static, derivative=derivative)
        ), new_trace

    def block_tangent(
        self, cell, state, trace: _Trace, lins: Linearisation, params_tangent
    ) -> jax.Array:
        """`z_t = ε_t · δθ` for the block's steps, `(C, K, N)`, from the state-sized recursion
        `z_t = D_t z_{t-1} + I_t δθ` with `z_0 = ε_0 · δθ`. Reverse mode transposes it into a
        backward pass over the block through the element-wise `D_t` only, with the weight
        gradient `Σ_t (∂h/∂u ⊙ λ_t) ⊗ a_t` as one matrix product per op."""
        structure = self.prepared()
        # `ε_0 · δθ`; the tangent of a prepared rule does not read the step's input.
        carried = flat_leaves(self.cell_tangent(cell, state, trace, None, params_tangent))
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        immediate = jnp.zeros((lins.jacobian.shape[0], *carried.shape), carried.dtype)
        for i, (op, site, delta) in enumerate(
            zip(structure.site_modules(cell), structure.sites, op_tangents)
        ):
            if site.traced:
                # The op's derivative along `δW` (for an op linear in all its arrays, the op
                # applied with `δW`; not for `U (V a)`, linear in each array only).
                primal, static = eqx.partition(op, eqx.is_inexact_array)
                tangent = eqx.filter(delta, eqx.is_inexact_array)

                def along(a, op=op, primal=primal, static=static, tangent=tangent):
                    return jax.jvp(
                        lambda p: algebra(op).apply(eqx.combine(p, static), a),
                        (primal,),
                        (tangent,),
                    )[1]

                u = jax.vmap(along)(lins.op_inputs[i])
                immediate = immediate + from_outputs(
                    structure, lins.op_sensitivities[i] * u[:, None], i
                )
        # Parameters that reach only the output (`None`) have no immediate term.
        if any(s is not None for s in lins.param_sensitivities):
            immediate = immediate + jax.vmap(
                lambda s: param_tangents(structure, s, other_tangents, carried.dtype)
            )(lins.param_sensitivities)

        def body(z, inputs):
            jacobian, step_immediate = inputs
            z = mix(jacobian, z) + step_immediate
            return z, z

        # In the state's dtype: inputs wider than the cell (a float64 layer below a float32
        # cell) give wider op terms.
        immediate = immediate.astype(carried.dtype)
        _, zs = jax.lax.scan(body, carried, (lins.jacobian, immediate))
        return zs


class DRTRL(AbstractWeightTraceAlgorithm[DRTRLTrace]):
    """Diagonal RTRL with parameter-dimension traces (Wang et al., *Nature Communications*, 2026).

    For every state leaf `k` and synaptic op `o` with output `u_o = op_o(a_t; W_o)`:

    $$
    ε_t[k, o] = \\sum_m B_o(D_t[k, m]) ⊙ ε_{t-1}[m, o] + \\mathrm{VJP}_W[op_o(a_t; ·)](∂h^k_t/∂u_o),
    $$

    where `D_t[k, m] = ∂h^k_t/∂h^m_{t-1}` with every op output held fixed (element-wise) and
    `B_o` spreads a per-output vector over `W_o` (for a dense op, the trace gains
    `∂h/∂u ⊗ a_t` each step). The online gradient is `∇W_o = Σ_k B_o(ḡ^k) ⊙ ε_t[k, o]`.
    Per-neuron parameters (e.g. a learnable time constant) get the exact element-wise trace
    `ε = Σ_m D ⊙ ε + ∂h/∂p`, small shared parameters a dense one.

    It is exact (equal to BPTT) for a single layer whose recurrence is element-wise, followed by
    a stateless read-out; with recurrent weights it drops the paths through other neurons.
    Memory per sample is `O(K·|θ|)`. Each cell of a `Sequential` has its own trace; the credit
    between layers within a step is exact. Stepping reads and writes the whole trace every
    step; `steps` (and `eqtrace.make_online_block`) computes the same values and gradients for
    a block of steps with one pass over the trace per block (see `cell_steps`).

    **Arguments:**

    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`).
      With `strict=False` the rule runs anyway as an approximation.
    - `trace_dtype`: dtype in which the weight traces are stored (e.g. `jnp.bfloat16` to halve
      their memory and bandwidth); the update is computed in the parameters' dtype. Defaults
      to the parameters' dtype.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    strict: bool = True
    trace_dtype: Any = None
    check_finite: bool = False
    trace_type: ClassVar[type] = DRTRLTrace

    def restriction(self, structure: CellStructure) -> None:
        del structure
        return None


class _BlockDerivative(AbstractDerivative):
    """A block's derivative as D-RTRL (or SnAp-1) defines it: `ε_t · δθ` for every step
    without forming `ε_t` (`block_tangent`), plus the exact `∂h_t/∂x_t · δx_t`."""

    algorithm: AbstractWeightTraceAlgorithm
    state: State  # `h_0`, before the block
    trace: Any  # `ε_0`
    lins: Linearisation
    previous: State  # `h_0 … h_{C-1}`, stacked

    @property
    def like(self) -> State:
        return self.lins.new_state

    def of_params(self, cell, xs, params_tangent):
        del xs
        zs = self.algorithm.block_tangent(cell, self.state, self.trace, self.lins, params_tangent)
        leaves, treedef = jtu.tree_flatten(self.lins.new_state)
        return jtu.tree_unflatten(
            treedef,
            [zs[:, k].reshape(leaf.shape).astype(leaf.dtype) for k, leaf in enumerate(leaves)],
        )

    def of_input(self, cell, xs, xs_tangent):
        return jax.vmap(lambda h, x, t: input_tangent(cell, h, x, t))(self.previous, xs, xs_tangent)
