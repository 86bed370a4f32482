"""OTTT: presynaptic traces for cells that leak with constant coefficients (a LIF layer with
its reset detached), the memory of D-RTRL's trace without its weight shape."""

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import algebra
from .._probing import probed_call
from .._structure import CellStructure, StructureError, constant_leak
from ._diagonal import (
    AbstractDiagonalAlgorithm,
    from_outputs,
    init_param_traces,
    linearise,
    op_dtype,
    param_tangents,
    state_dtype,
    step_param_traces,
    unflatten_like,
)


class OTTTTrace(eqx.Module):
    """OTTT's trace: per call of a synaptic op in a step, its presynaptic trace `â` per state
    leaf, `(K, *input_shape)`, and the trace of a bias (whose input is the constant 1), `(K,)`
    (`None` for calls that do not reach the state, i.e. read-outs); per other parameter, its
    exact element-wise (or dense) trace, as in D-RTRL."""

    inputs: tuple[Array | None, ...]
    biases: tuple[Array | None, ...]
    params: tuple[Array | None, ...]


class OTTT(AbstractDiagonalAlgorithm[OTTTTrace]):
    """Online training through time (Xiao et al., "Online Training Through Time for Spiking
    Neural Networks", NeurIPS 2022): a presynaptic trace per op input, decayed by the
    neurons' constant leak, in place of a weight-shaped trace.

    For a leaky integrator of its ops' outputs, `v_t = λ v_{t-1} + W a_t + …` with the reset
    detached (`eqtrace.nn.LIF(..., detach_reset=True)`), the paper's rule is

    $$
    \\hat a_t = λ\\, \\hat a_{t-1} + a_t, \\qquad ∇W \\mathrel{+}= \\bar g_t \\otimes \\hat a_t,
    $$

    with `ḡ_t = dL_t/dv_t` the instantaneous cotangent, exact within the step through the
    layers above. In general, with `K` state leaves, OTTT needs the cut state Jacobian
    `Λ = ∂h_t/∂h_{t-1}` (op outputs held fixed: the leak) and each op's drive
    `c = ∂h_t/∂u` to be constants, the same for every neuron; then D-RTRL's trace is
    `ε_t[k, i, j] = Σ_τ (Λ^{t-τ} c)[k] a_τ[j]`, the same for every output `i`, and OTTT keeps
    it as `â_t[k] = Σ_m Λ[k, m] â_{t-1}[m] + c[k] a_t`: `K·I` values per op instead of
    `K·I·O`. On the cells it accepts it computes D-RTRL's gradient exactly, so it equals BPTT
    for one feed-forward layer under a read-out at each step (the paper's claim, for BPTT
    with the reset detached too). Both conditions are read from the code of the cell's step,
    never from sampled values; a cell that breaks them (a gated cell, a reset that is
    differentiated, learnt or per-neuron time constants) is refused, naming what the leak
    depends on. Per-neuron parameters outside the ops get D-RTRL's exact element-wise traces.

    **Arguments:**

    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`);
      the constant leak is required either way.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf.
    """

    strict: bool = True
    check_finite: bool = False

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> CellStructure:
        """The diagonal structure with the cell's constant leak and drives (or why it has
        none)."""
        structure = super().cell_structure(cell, state, x)
        leak = constant_leak(cell, state, x, structure)
        return dataclasses.replace(structure, constant_leak=leak)

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        del cell, state
        leak = structure.constant_leak
        assert leak is not None  # `cell_structure` analyses it
        if leak.problems:
            problems = "\n".join(f"  - {p}" for p in leak.problems)
            raise StructureError(
                f"OTTT cannot trace {structure.cell_name}: its presynaptic traces need a leaky "
                "integrator of the ops' outputs with a constant leak and drive, the same for "
                f"every neuron, but\n{problems}\nFor a LIF layer, detach the reset "
                '(`eqtrace.nn.LIF(..., reset="subtract", detach_reset=True)`, as Xiao et al. '
                "do) and keep its time constants fixed; otherwise use `eqtrace.DRTRL()`, whose "
                "weight-shaped traces follow any per-neuron leak."
            )

    def cell_notes(self, cell: AbstractCell, state: State, x: ExampleInput) -> tuple[str, ...]:
        structure = self.cell_structure(cell, state, x)
        leak = structure.constant_leak
        if leak is None or leak.problems or leak.leak is None:
            return ()
        return (
            "OTTT: presynaptic traces decayed by the constant leak "
            f"{np.array2string(leak.leak, precision=4, separator=', ')} (per state leaf).",
        )

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> OTTTTrace:
        structure = self.required_structure(cell, state, x)
        k = structure.num_leaves
        sites = structure.site_modules(cell)
        return OTTTTrace(
            inputs=tuple(
                jnp.zeros((k, *site.input_shape), op_dtype(op)) if site.traced else None
                for site, op in zip(structure.sites, sites)
            ),
            biases=tuple(
                jnp.zeros((k,), op_dtype(op))
                if site.traced and algebra(op).bias(op) is not None
                else None
                for site, op in zip(structure.sites, sites)
            ),
            params=init_param_traces(structure, cell),
        )

    def cell_step(
        self, cell: AbstractCell, state: State, trace: OTTTTrace, x: Input
    ) -> tuple[State, OTTTTrace]:
        structure = self.prepared()
        leak = structure.constant_leak
        assert leak is not None and leak.leak is not None
        if any(t is not None for t in trace.params):
            lin = linearise(cell, structure, state, x)
            new_state, op_inputs = lin.new_state, lin.op_inputs
            params = step_param_traces(structure, lin, trace.params)
        else:  # Only the ops are traced: the forward step and its op inputs suffice.
            new_state, records = probed_call(cell, state, x, cut=False, sites=structure.site_ops)
            op_inputs, params = tuple(a for a, _ in records), trace.params
        inputs, biases = [], []
        for eps, bias, a, drive in zip(trace.inputs, trace.biases, op_inputs, leak.drives):
            if eps is None or drive is None:  # A read-out call: no trace.
                inputs.append(None)
                biases.append(None)
                continue
            lam = jnp.asarray(leak.leak, eps.dtype)
            c = jnp.asarray(drive, eps.dtype)
            a = a.astype(eps.dtype)
            inputs.append(jnp.tensordot(lam, eps, axes=1) + c.reshape(-1, *[1] * a.ndim) * a[None])
            biases.append(None if bias is None else lam @ bias + c)
        return new_state, OTTTTrace(inputs=tuple(inputs), biases=tuple(biases), params=params)

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: OTTTTrace, x: Input, params_tangent: Any
    ) -> State:
        structure = self.prepared()
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        dtype = state_dtype(state)
        rows = list(param_tangents(structure, trace.params, other_tangents, dtype))
        for i, (op, eps, bias, delta) in enumerate(
            zip(structure.site_modules(cell), trace.inputs, trace.biases, op_tangents)
        ):
            if eps is None:  # A read-out call: exact gradient through `output`.
                continue
            rules = algebra(op)
            for k in range(len(rows)):
                delta_k = delta
                bias_tangent = rules.bias(delta)
                if bias_tangent is not None and bias is not None:
                    scaled = bias_tangent * bias[k].astype(bias_tangent.dtype)
                    delta_k = eqx.tree_at(rules.bias, delta, scaled)
                # `δW â[k] + δb b̂[k]`, through the op's own code (its mask included).
                _, du = eqx.filter_jvp(functools.partial(rules.apply, a=eps[k]), (op,), (delta_k,))
                rows[k] = rows[k] + from_outputs(structure, du, i).astype(dtype)
        return unflatten_like(state, rows)
