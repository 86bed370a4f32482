from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._algorithm import (
    AbstractAlgorithm,
    error_if_not_finite,
    fill_tangent,
    has_tangent,
    input_tangent,
    zeros_like_batched,
)
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import (
    apply_op,
    contract,
    op_params,
    outer,
    outer_sum,
    spread,
    weights_reach_one_output,
)
from ._diagonal import (
    Linearisation,
    cell_structure,
    flat_leaves,
    from_outputs,
    init_param_traces,
    linearise,
    linearise_block,
    mix,
    param_tangents,
    state_dtype,
    to_outputs,
    unflatten_like,
    update_param_traces,
)


def _propagate(spread_jacobian, trace, immediate):
    """`ε[…, k] ← Σ_m B(D[k, m]) ⊙ ε[…, m] + VJP_W(∂h^k/∂u)` for one parameter array. The leaf
    axis is the last, so the K-by-K mixing stays within each weight's few values and XLA fuses
    the update into one pass over the trace."""
    dtype = immediate.dtype
    new = immediate + sum(
        spread_jacobian[..., m] * trace[..., m : m + 1].astype(dtype)
        for m in range(trace.shape[-1])
    )
    return new.astype(trace.dtype)


class DRTRLTrace(eqx.Module):
    """D-RTRL's trace: per call of a synaptic op in a step, the op's parameters' traces for
    all state leaves, shaped `(*W.shape, K)` (`None` for calls that do not reach the state,
    i.e. read-outs); per other parameter, its element-wise (or dense) trace (`None` if it does
    not reach the state).

    An op called twice has a trace per call: the calls may reach different neurons, and the
    rule's weight gradient is the sum over the calls."""

    ops: tuple[Any, ...]
    params: tuple[jax.Array | None, ...]


class DRTRL(AbstractAlgorithm):
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
    per_layer: ClassVar[bool] = True

    def _structure(self, cell, state, x):
        structure = cell_structure("DRTRL", cell, state, x, self.strict)
        for site, op in enumerate(structure.site_modules(cell)):
            if not weights_reach_one_output(op):
                raise ValueError(
                    f"DRTRL cannot trace the op `{structure.site_name(site)}` "
                    f"({type(op).__name__}) of "
                    f"{structure.cell_name}: it shares each weight across many outputs, so a "
                    "weight-shaped trace per neuron is not defined. Use `eqtrace.PPProp(...)`, "
                    "whose input/output traces handle shared weights."
                )
        return structure

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> DRTRLTrace:
        structure = self._structure(cell, state, x)
        k = structure.num_leaves
        ops = tuple(
            jtu.tree_map(
                lambda w: jnp.zeros((*w.shape, k), self.trace_dtype or w.dtype), op_params(op)
            )
            if traced
            else None
            for op, traced in zip(structure.site_modules(cell), structure.site_traced)
        )
        return DRTRLTrace(ops=ops, params=init_param_traces(structure, cell))

    def update(
        self, cell: AbstractCell, state: State, trace: DRTRLTrace, x: Input
    ) -> tuple[State, DRTRLTrace]:
        structure = self._structure(cell, state, x)
        lin = linearise(cell, structure, state, x)
        new_ops = []
        for i, (op, a, df, eps) in enumerate(
            zip(structure.site_modules(cell), lin.op_inputs, lin.op_sensitivities, trace.ops)
        ):
            if eps is None:  # A read-out op: exact gradient through `output`, no trace.
                new_ops.append(None)
                continue
            d_out = jnp.moveaxis(to_outputs(structure, lin.jacobian, i), (0, 1), (-2, -1))
            propagate = spread(op, d_out)  # leaves (…, K, K)
            immediate = outer(op, a, jnp.moveaxis(df, 0, -1))  # leaves (…, K)
            new_ops.append(jtu.tree_map(_propagate, propagate, eps, immediate))
        new_params = update_param_traces(structure, lin, trace.params)
        return lin.new_state, DRTRLTrace(ops=tuple(new_ops), params=new_params)

    def parameter_tangent(
        self, cell: AbstractCell, state: State, x: Input, trace: DRTRLTrace, params_tangent
    ) -> State:
        structure = self._structure(cell, state, x)
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        from_params = param_tangents(structure, trace.params, other_tangents, state_dtype(state))
        # One row per state leaf, kept apart: a leaf the loss does not reach gets a symbolic
        # zero cotangent, and JAX then skips reading that leaf's trace in the backward pass.
        rows = []
        for k in range(structure.num_leaves):
            row = from_params[k]
            for i, (op, eps, delta) in enumerate(
                zip(structure.site_modules(cell), trace.ops, op_tangents)
            ):
                if eps is not None:
                    eps_k = jtu.tree_map(lambda e, d: e[..., k].astype(d.dtype), eps, delta)
                    row = row + from_outputs(structure, contract(op, eps_k, delta), i)
            rows.append(row)
        return unflatten_like(state, rows)

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: DRTRLTrace, xs: Input
    ) -> tuple[State, DRTRLTrace]:
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
        x = jtu.tree_map(lambda a: a[0], xs)
        structure = self._structure(cell, state, x)
        params, static = eqx.partition(cell, eqx.is_inexact_array)
        frozen = eqx.combine(jax.lax.stop_gradient(params), static)
        state, trace = jax.lax.stop_gradient((state, trace))
        lins, previous = linearise_block(frozen, structure, state, jax.lax.stop_gradient(xs))
        products, first = _transition_products(lins.jacobian)
        new_ops = []
        for i, (op, eps) in enumerate(zip(structure.site_modules(frozen), trace.ops)):
            if eps is None:  # A read-out op: exact gradient through `output`, no trace.
                new_ops.append(None)
                continue
            phi = to_outputs(structure, products, i)  # (C, K, K, *u)
            sensitivities = lins.op_sensitivities[i]  # (C, K, *u)
            immediate = sum(
                phi[:, :, m] * sensitivities[:, m, None] for m in range(sensitivities.shape[1])
            )  # (C, K, *u): Φ(C, τ) ∂h_τ/∂u_τ
            immediate = jnp.moveaxis(immediate, 1, -1)
            carried = jnp.moveaxis(to_outputs(structure, first, i), (0, 1), (-2, -1))
            summed = outer_sum(op, lins.op_inputs[i], immediate)
            new_ops.append(jtu.tree_map(_propagate, spread(op, carried), eps, summed))
        new_params = _propagate_param_traces(structure, products, first, lins, trace.params)
        states, new_trace = lins.new_state, DRTRLTrace(ops=tuple(new_ops), params=new_params)
        if self.check_finite:
            states, new_trace = error_if_not_finite(self, (states, new_trace))
        link = _block_link(
            params,
            xs,
            algorithm=self,
            static=static,
            state=state,
            trace=trace,
            lins=lins,
            previous=previous,
        )
        return jtu.tree_map(jnp.add, states, link), new_trace

    def _block_parameter_tangent(
        self, cell, state, x, trace: DRTRLTrace, lins: Linearisation, params_tangent
    ) -> jax.Array:
        """`z_t = ε_t · δθ` for the block's steps, `(C, K, N)`, from the state-sized recursion
        `z_t = D_t z_{t-1} + I_t δθ` with `z_0 = ε_0 · δθ`. Reverse mode transposes it into a
        backward pass over the block through the element-wise `D_t` only, with the weight
        gradient `Σ_t (∂h/∂u ⊙ λ_t) ⊗ a_t` as one matrix product per op."""
        structure = self._structure(cell, state, x)
        carried = flat_leaves(self.parameter_tangent(cell, state, x, trace, params_tangent))
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        immediate = jnp.zeros((lins.jacobian.shape[0], *carried.shape), carried.dtype)
        for i, (op, traced, delta) in enumerate(
            zip(structure.site_modules(cell), structure.site_traced, op_tangents)
        ):
            if traced:
                delta_op = eqx.combine(delta, eqx.filter(op, eqx.is_inexact_array, inverse=True))
                u = jax.vmap(lambda a: apply_op(delta_op, a))(lins.op_inputs[i])
                immediate = immediate + from_outputs(
                    structure, lins.op_sensitivities[i] * u[:, None], i
                )
        if lins.param_sensitivities:
            immediate = immediate + jax.vmap(
                lambda s: param_tangents(structure, s, other_tangents, carried.dtype)
            )(lins.param_sensitivities)

        def body(z, inputs):
            jacobian, step_immediate = inputs
            z = mix(jacobian, z) + step_immediate
            return z, z

        _, zs = jax.lax.scan(body, carried, (lins.jacobian, immediate))
        return zs


def _transition_products(jacobians: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From `D_1 … D_C` `(C, K, K, N)`: `Φ(C, τ) = D_C ⋯ D_{τ+1}` for `τ = 1 … C` stacked
    (`Φ(C, C) = I`), and `Φ(C, 0)`."""
    k, n = jacobians.shape[1], jacobians.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=jacobians.dtype)[..., None], (k, k, n))

    def body(product, jacobian):
        # Sums of element-wise products: a dot over the tiny K axis, batched over neurons,
        # is many times slower on CPU.
        new = product[:, 0, None] * jacobian[None, 0]
        for m in range(1, k):
            new = new + product[:, m, None] * jacobian[None, m]
        return new, product

    first, products = jax.lax.scan(body, eye, jacobians, reverse=True)
    return products, first


def _propagate_param_traces(
    structure, products, first, lins, traces
) -> tuple[jax.Array | None, ...]:
    """The non-op parameters' traces over the block, `Φ(C, 0) ε_0 + Σ_τ Φ(C, τ) ∂h_τ/∂p`."""
    new = []
    for kind, trace, immediate in zip(structure.param_kinds, traces, lins.param_sensitivities):
        if kind == "readout":
            new.append(None)
            continue
        if kind == "shared":  # `(K, N, |p|)`
            per_step, carried = products[..., None], first[..., None]
        else:  # `(K, *neuron_shape)`
            per_step = products.reshape(*products.shape[:3], *structure.neuron_shape)
            carried = first.reshape(*first.shape[:2], *structure.neuron_shape)
        new.append(mix(carried, trace) + jnp.sum(jax.vmap(mix)(per_step, immediate), axis=0))
    return tuple(new)


@eqx.filter_custom_jvp
def _block_link(params, xs, *, algorithm, static, state, trace, lins, previous):
    """Zero in value, stacked like the block's states. Its JVP is each step's derivative as
    D-RTRL defines it: `ε_t · δθ` plus the exact `∂h_t/∂x_t` applied to `δx_t`."""
    del params, xs, algorithm, static, state, trace, previous
    return zeros_like_batched(lins.new_state)


@_block_link.def_jvp
def _block_link_jvp(primals, tangents, *, algorithm, static, state, trace, lins, previous):
    params, xs = primals
    params_tangent, xs_tangent = tangents
    zeros = zeros_like_batched(lins.new_state)
    cell = eqx.combine(params, static)
    tangent = zeros
    if has_tangent(params_tangent):
        x = jtu.tree_map(lambda a: a[0], xs)
        zs = algorithm._block_parameter_tangent(
            cell, state, x, trace, lins, fill_tangent(params, params_tangent)
        )
        leaves, treedef = jtu.tree_flatten(lins.new_state)
        tangent = jtu.tree_unflatten(
            treedef,
            [zs[:, k].reshape(leaf.shape).astype(leaf.dtype) for k, leaf in enumerate(leaves)],
        )
    if has_tangent(xs_tangent):
        from_xs = jax.vmap(lambda h, x, t: input_tangent(cell, h, x, t))(previous, xs, xs_tangent)
        tangent = jtu.tree_map(jnp.add, tangent, from_xs)
    return zeros, tangent
