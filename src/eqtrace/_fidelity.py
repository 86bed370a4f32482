"""A fidelity monitor for `train_online`: now and then, how close the online gradient is to the
exact one, measured on a few samples of the batch while training runs."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from ._algorithm import AbstractAlgorithm
from ._diagnostics import GradientComparison, compare_gradients
from ._validation import is_key


#: The references a `FidelityMonitor` can compare with.
REFERENCES = ("window", "rtrl")
#: The sub-batch monitored when `samples` is not given: this many samples, or the whole batch.
DEFAULT_SAMPLES = 4


class FidelityMonitor(eqx.Module):
    """What `eqtrace.train_online(..., monitor=FidelityMonitor(...))` measures while it trains:
    every `every` updates, the cosine and the norm ratio of the online gradient to an exact
    reference, per parameter and overall, on the first `samples` samples of the batch.

    Two references, which measure two different things:

    - `reference="window"` (the default): **the rule's error over a horizon of `window`
      updates.** At a measured update `u`, from the state the stream had `window` updates
      earlier (kept for the sub-batch), both gradients are re-run over those `window` updates
      with the parameters of update `u`, held fixed: the estimate is the rule's online
      gradient, summed over the window's updates and started from a **fresh** trace (as
      `init_state_and_trace` makes it); the reference is backpropagation through time through
      the window's steps (`bptt_gradient` from the window's first state). Both see the window
      and nothing before it, so an exact rule (`RTRL`) reads cosine 1 and ratio 1 whatever the
      window, and the gap is what the rule's approximation loses within `window` updates.
      It cannot see what the trace carries from before the window: choose a window at least
      as long as the memory the task needs (one update is where most rules are exact).
      Cost: every `every` updates, `window` updates of the rule and of forward and backward
      passes, on `samples` samples; and `window` states of the sub-batch kept.
    - `reference="rtrl"`: **the error of the very update training takes.** Exact RTRL is
      carried alongside training on the sub-batch, through the same states and parameters;
      at a measured update the estimate is the gradient of that update's loss on the
      sub-batch, with the trace training carries, and the reference is RTRL's gradient of the
      same loss. With parameters that do not change (a zero learning rate) the reference is
      BPTT through the whole stream; while training, it is what exact online RTRL would have
      computed along the same trajectory. Its RTRL trace starts at zero at each call of
      `train_online`, so it is the full-history reference when the call starts the
      sequences (a fresh state and trace), not for one stream cut into calls. Cost: RTRL's
      trace, `samples · |h| · |θ|` numbers, and its update, `O(|h|² · |θ|)` per sample, at
      **every** update: for small models.

    Both gradients use the loss training uses for that update (its step weights, and a block's
    mean), so the norm ratio compares like with like. Training itself is not changed:
    nothing the monitor computes feeds back, so the trained parameters are the same with it
    on or off (up to the order in which XLA compiles the arithmetic of the two programs).
    The schedule (`every`, `window`) is static: measured updates cost their work, the others
    none (RTRL's trace aside), and no setting retraces per update.

    **Arguments:**

    - `every`: measure every `every` updates: updates `every - 1`, `2 every - 1`, … (counting
      from 0; with `reference="window"`, from update `window - 1` on, the first full window).
    - `samples`: how many samples of the batch (the first ones) to measure on; by default 4,
      or the whole batch if it is smaller. A stream without a batch axis is one sample.
    - `reference`: `"window"` or `"rtrl"`, as above.
    - `window`: with `reference="window"`, the number of updates in the window (by default
      `every`, so that the windows tile the stream); `None` with `"rtrl"`.
    """

    every: int = eqx.field(static=True)
    samples: int | None = eqx.field(default=None, static=True)
    reference: str = eqx.field(default="window", static=True)
    window: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        _check_count("every", self.every, "measure every `every` updates", "every=100")
        if self.samples is not None:
            _check_count(
                "samples", self.samples, "the number of samples of the batch to measure on",
                "samples=4",
            )  # fmt: skip
        if self.reference not in REFERENCES:
            raise ValueError(
                'FidelityMonitor: `reference` must be "window" (BPTT over the last `window` '
                'updates) or "rtrl" (exact RTRL carried alongside), but received '
                f"{self.reference!r}."
            )
        if self.window is not None:
            if self.reference == "rtrl":
                raise ValueError(
                    'FidelityMonitor: `window` sets the length of the window of `reference="'
                    'window"`, but `reference="rtrl"` compares each measured update on its '
                    f"own, with the full history: received `window={self.window!r}`. Drop "
                    '`window`, or pass `reference="window"`.'
                )
            _check_count("window", self.window, "the number of updates in a window", "window=50")

    @property
    def window_updates(self) -> int:
        """The number of updates in a window (1 for `reference="rtrl"`)."""
        if self.reference == "rtrl":
            return 1
        return self.every if self.window is None else self.window

    def measured(self, updates: int) -> list[int]:
        """The updates, out of `updates`, at which this monitor measures."""
        first = self.window_updates - 1
        return [u for u in range(updates) if (u + 1) % self.every == 0 and u >= first]


def _check_count(name: str, value: Any, meaning: str, example: str) -> None:
    """Raises unless `value` is a Python `int >= 1`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(
            f"FidelityMonitor: `{name}` must be a Python int >= 1 ({meaning}), but received "
            f"{value!r}. Pass e.g. `{example}`; to measure nothing, pass `monitor=None` to "
            "`train_online`."
        )


_Series = Float[Array, " m"]


class Fidelity(eqx.Module):
    """What a `FidelityMonitor` measured during `train_online`: one entry per measured update,
    in order (the updates it did not measure have no entry).

    `print(fidelity)` gives a table, one row per measured update; `fidelity.comparison(i)` is
    the `eqtrace.GradientComparison` of the `i`-th measured update, which prints the
    per-parameter table.

    **Attributes:**

    - `update`: the index of each measured update (counting from 0: the `u`-th optimiser
      update, i.e. step `u`, or block `u` with `block_size`).
    - `step`: the last step of each measured update.
    - `overall_cosine`, `overall_norm_ratio`: over all parameters, as in
      `eqtrace.compare_gradients`, shape `(m,)` for `m` measured updates.
    - `overall_estimate_norm`, `overall_reference_norm`: the norms of the two gradients.
    - `cosine`, `norm_ratio`, `estimate_norm`, `reference_norm`: per parameter, pytrees shaped
      like the parameters with a `(m,)` array per leaf (`None` where the parameters have
      `None`).
    - `paths`, `sizes`: the path and size of each parameter leaf.
    - `reference`, `window`, `samples`: what was measured (`window` in updates; 1 for
      `"rtrl"`), and on how many samples.
    """

    update: Int[Array, " m"]
    step: Int[Array, " m"]
    overall_cosine: _Series
    overall_norm_ratio: _Series
    overall_estimate_norm: _Series
    overall_reference_norm: _Series
    cosine: PyTree[_Series | None]
    norm_ratio: PyTree[_Series | None]
    estimate_norm: PyTree[_Series | None]
    reference_norm: PyTree[_Series | None]
    paths: tuple[str, ...] = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)
    reference: str = eqx.field(static=True)
    window: int = eqx.field(static=True)
    samples: int = eqx.field(static=True)

    def comparison(self, i: int) -> GradientComparison:
        """The `eqtrace.GradientComparison` of the `i`-th measured update (`print` it for the
        per-parameter table)."""
        pick = _pick(i)
        return GradientComparison(
            cosine=jtu.tree_map(pick, self.cosine),
            norm_ratio=jtu.tree_map(pick, self.norm_ratio),
            estimate_norm=jtu.tree_map(pick, self.estimate_norm),
            reference_norm=jtu.tree_map(pick, self.reference_norm),
            overall_cosine=self.overall_cosine[i],
            overall_norm_ratio=self.overall_norm_ratio[i],
            overall_estimate_norm=self.overall_estimate_norm[i],
            overall_reference_norm=self.overall_reference_norm[i],
            paths=self.paths,
            sizes=self.sizes,
        )

    def __str__(self) -> str:
        what = (
            f"BPTT over windows of {self.window} update{'s' if self.window > 1 else ''}"
            if self.reference == "window"
            else "exact RTRL alongside"
        )
        header = f"eqtrace fidelity ({what}, {self.samples} sample{'s' * (self.samples > 1)}):"
        try:
            rows = list(
                zip(
                    np.asarray(self.update).tolist(),
                    np.asarray(self.step).tolist(),
                    np.asarray(self.overall_cosine, float).tolist(),
                    np.asarray(self.overall_norm_ratio, float).tolist(),
                )
            )
            lowest = _lowest_cosines(self.cosine, self.paths)
        except jax.errors.ConcretizationTypeError:
            return (
                "eqtrace.Fidelity: the values are traced (inside `jax.jit` or another "
                "transformation); return it and print it outside."
            )
        if not rows:
            return f"{header}\n  no update measured (fewer updates than `every` or `window`)."
        lines = [header, f"  {'update':>6}  {'step':>6}  {'cosine':>9}  {'norm ratio':>10}  lowest"]
        for (update, step, cosine, ratio), low in zip(rows, lowest):
            lines.append(
                f"  {update:>6}  {step:>6}  {cosine:>9.4f}  {ratio:>10.4f}  {low}".rstrip()
            )
        return "\n".join(lines)


def _pick(i: int) -> Callable[[Any], Any]:
    return lambda a: a[i]


def _lowest_cosines(cosine: Any, paths: tuple[str, ...]) -> list[str]:
    """Per measured update, the parameter of lowest cosine and its cosine, in words."""
    leaves = [np.asarray(leaf, float) for leaf in jtu.tree_leaves(cosine)]
    if not leaves:
        return []
    table = np.stack(leaves)  # (leaves, m)
    found = []
    for column in table.T:
        finite = np.where(np.isfinite(column), column, np.inf)
        i = int(np.argmin(finite))
        # Nothing to point at in a single leaf, or where every cosine is 1 up to round-off.
        equal = not np.isfinite(finite[i]) or 1 - finite[i] <= 1e-6
        found.append("" if len(leaves) == 1 or equal else f"{paths[i]} ({column[i]:.4f})")
    return found


# The monitor inside `train_online`.


def _batch_size(model: Any, state: Any) -> int | None:
    """The batch size of `state` (a leading axis on every leaf), or `None` for one sample."""
    single = jax.eval_shape(model.init_state)
    single_shapes = [leaf.shape for leaf in jtu.tree_leaves(single)]
    shapes = [jnp.shape(leaf) for leaf in jtu.tree_leaves(state)]
    if shapes == single_shapes:
        return None
    sizes = {shape[0] for shape in shapes if len(shape) >= 1}
    if len(sizes) == 1 and [shape[1:] for shape in shapes] == single_shapes:
        return sizes.pop()
    raise ValueError(
        "train_online: the monitor needs a state laid out as `model.init_state()`, with or "
        f"without one leading batch axis, but received the shapes {shapes} for "
        f"{single_shapes}. Create the state with `eqtrace.init_state_and_trace(model, "
        "algorithm, batch_size=B)`."
    )


@dataclasses.dataclass(frozen=True)
class Monitor:
    """A `FidelityMonitor` set up for one call of `train_online`."""

    config: FidelityMonitor
    objective: Any  # the `_Objective` of the sub-batch
    sequences: Any  # its `(xs, targets, weights)`, time leading
    online_step: Callable  # the user's online step or block
    rule: AbstractAlgorithm
    forward_step: Callable  # vmapped over the sub-batch if the stream is batched
    rtrl_step: Callable | None  # idem, exact RTRL (for `reference="rtrl"`)
    rtrl_trace: Any  # the initial RTRL trace of the sub-batch
    init_trace: Callable[[Any], Any]  # the sub-batch's PRNG keys -> a fresh trace
    sub: Callable[[Any], Any]  # the sub-batch of a state or trace
    block_size: int | None
    length: int  # the number of steps
    samples: int | None  # None: one sequence, without a batch axis
    dtype: Any  # of the metrics

    @property
    def steps_per_update(self) -> int:
        return 1 if self.block_size is None else self.block_size

    def updates(self) -> int:
        return -(-self.length // self.steps_per_update)

    def init_carry(self, state: Any) -> Any:
        """What the monitor carries through the scan, besides the update counter: the
        sub-batch's states of the last `window` updates, or the RTRL trace."""
        if self.config.reference == "rtrl":
            return self.rtrl_trace
        window = self.config.window_updates
        return jtu.tree_map(lambda a: jnp.broadcast_to(a, (window, *a.shape)), self.sub(state))

    def measure(self, u, carry, params, state, trace, inputs):
        """The monitor's part of update `u`: its new carry and the metrics (NaN if `u` is not
        measured, which the driver drops)."""
        config = self.config
        if not config.measured(self.updates()):  # a stream too short for the schedule
            return carry, self._nan_metrics(params)
        measured = ((u + 1) % config.every == 0) & (u >= config.window_updates - 1)
        # The sub-batch's trace is sliced inside the measuring branch only: a trace can be
        # large (D-RTRL's is K·|θ| per sample), and the other updates need none of it.
        state_k = self.sub(state)
        inputs_k = self._sub_inputs(inputs)
        if config.reference == "rtrl":

            def measure_rtrl(rtrl_trace):
                trace_k = self.sub(trace)
                loss = self._update_loss(self.online_step, params, state_k, trace_k, inputs_k)
                estimate = jax.grad(loss, has_aux=True)(params)[0]
                rtrl_trace, reference = self._rtrl_update(
                    params, state_k, rtrl_trace, inputs_k, True
                )
                return rtrl_trace, self._compare(estimate, reference)

            def advance_rtrl(rtrl_trace):
                rtrl_trace, _ = self._rtrl_update(params, state_k, rtrl_trace, inputs_k, False)
                return rtrl_trace, self._nan_metrics(params)

            return jax.lax.cond(measured, measure_rtrl, advance_rtrl, carry)

        window = config.window_updates
        # The rule's PRNG keys (UORO's), for the window's fresh trace: fresh draws.
        keys = self.sub([leaf for leaf in jtu.tree_leaves(trace) if is_key(leaf)])
        states = jtu.tree_map(
            lambda ring, a: jax.lax.dynamic_update_index_in_dim(ring, a, u % window, 0),
            carry,
            state_k,
        )

        steps_now = jtu.tree_leaves(inputs[0])[0].shape[0] if self.block_size else 1
        span = (window - 1) * self.steps_per_update + steps_now
        if span > self.length:  # no window of this shape fits in the stream: never measured
            return states, self._nan_metrics(params)

        def measure_window():
            first = jtu.tree_map(
                lambda ring: jax.lax.dynamic_index_in_dim(
                    ring, (u - window + 1) % window, 0, keepdims=False
                ),
                states,
            )
            start = (u - window + 1) * self.steps_per_update
            sequences = jtu.tree_map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, start, span, 0), self.sequences
            )
            # A window of equal updates is scanned whole; one that ends with the last, shorter
            # block of the stream scans the others and then takes that one.
            uniform = steps_now == self.steps_per_update
            earlier, last = self._split(sequences, window if uniform else window - 1)
            last = None if uniform else last
            estimate = self._online_window(params, first, keys, earlier, last)
            reference = jax.grad(self._bptt_window)(params, first, earlier, last)
            return self._compare(estimate, reference)

        metrics = jax.lax.cond(measured, measure_window, lambda: self._nan_metrics(params))
        return states, metrics

    def _sub_inputs(self, inputs: Any) -> Any:
        """The sub-batch of one update's `(x, target, weight)` (time leading in a block)."""
        xs, targets, weights = inputs
        axis = 0 if self.block_size is None else 1
        return (self._take(xs, axis), self._take(targets, axis), weights)

    def _take(self, tree: Any, axis: int) -> Any:
        return tree if self.samples is None else _take(tree, axis, self.samples)

    def _update_loss(self, step, params, state, trace, inputs):
        """`params -> (loss, (state, trace))` of one update, as training computes it."""
        objective = self.objective
        x, target, weight = inputs

        def loss(params):
            new_state, new_trace, y = step(params, state, trace, x)
            if self.block_size is None:
                value = objective.step_loss(y, target)
                value = value if weight is None else weight * value
            else:
                values = jax.vmap(objective.step_loss)(y, target)
                value = jnp.mean(values if weight is None else weight * values)
            return value, (new_state, new_trace)

        return loss

    def _rtrl_update(self, params, state, rtrl_trace, inputs, with_grad):
        """Advances the RTRL trace over one update; with `with_grad`, also the gradient of the
        update's loss (a block's steps one at a time: its mean's gradient is the mean of
        theirs, each taken at its step, which keeps one step's RTRL trace in memory)."""
        assert self.rtrl_step is not None
        objective = self.objective

        def step(carry, inputs, scale):
            state, rtrl_trace, grads = carry
            x, target, weight = inputs
            if not with_grad:
                state, rtrl_trace, _ = self.rtrl_step(params, state, rtrl_trace, x)
                return (state, rtrl_trace, grads), None

            def loss(params):
                new_state, new_trace, y = self.rtrl_step(params, state, rtrl_trace, x)
                value = objective.step_loss(y, target) * scale
                return (value if weight is None else weight * value), (new_state, new_trace)

            step_grads, (state, rtrl_trace) = jax.grad(loss, has_aux=True)(params)
            return (state, rtrl_trace, jtu.tree_map(jnp.add, grads, step_grads)), None

        zeros = jtu.tree_map(jnp.zeros_like, params) if with_grad else None
        carry = (state, rtrl_trace, zeros)
        if self.block_size is None:
            carry, _ = step(carry, inputs, 1.0)
        else:
            n = jtu.tree_leaves(inputs[0])[0].shape[0]
            carry, _ = jax.lax.scan(lambda c, i: step(c, i, 1.0 / n), carry, inputs)
        return carry[1], carry[2]

    def _split(self, sequences: Any, earlier: int) -> tuple[Any, Any]:
        """A window's `(xs, targets, weights)` as its first `earlier` updates (stacked along a
        leading axis) and its last update."""
        c = self.steps_per_update

        def first(a):
            a = a[: earlier * c]
            return a if self.block_size is None else a.reshape(earlier, c, *a.shape[1:])

        def last(a):
            if a.shape[0] == earlier * c:
                return None
            return a[earlier * c] if self.block_size is None else a[earlier * c :]

        return jtu.tree_map(first, sequences), jtu.tree_map(last, sequences)

    def _online_window(self, params, state, keys, earlier, last):
        """The rule's online gradient summed over a window's updates, from `state` and a
        fresh trace (with the PRNG keys `keys`)."""
        trace = self.init_trace(keys)

        def update(carry, inputs):
            state, trace, grads = carry
            loss = self._update_loss(self.online_step, params, state, trace, inputs)
            step_grads, (state, trace) = jax.grad(loss, has_aux=True)(params)
            return (state, trace, jtu.tree_map(jnp.add, grads, step_grads)), None

        carry = (state, trace, jtu.tree_map(jnp.zeros_like, params))
        carry, _ = jax.lax.scan(update, carry, earlier)
        if last is not None:
            carry, _ = update(carry, last)
        return carry[2]

    def _bptt_window(self, params, state, earlier, last):
        """The window's loss, the sum of its updates' losses as training computes them, as a
        function of the parameters through every state of the window (BPTT)."""
        objective = self.objective

        def step(state, inputs):
            x, target, weight = inputs
            state, y = self.forward_step(params, state, x)
            value = objective.step_loss(y, target)
            return state, (value if weight is None else weight * value)

        def update(state, inputs):
            if self.block_size is None:
                return step(state, inputs)
            state, values = jax.lax.scan(step, state, inputs)
            return state, jnp.mean(values)

        state, losses = jax.lax.scan(update, state, earlier)
        if last is None:
            return jnp.sum(losses)
        _, loss = update(state, last)
        return jnp.sum(losses) + loss

    def _compare(self, estimate: Any, reference: Any) -> tuple:
        comparison = compare_gradients(estimate, reference)
        metrics = (
            comparison.overall_cosine,
            comparison.overall_norm_ratio,
            comparison.overall_estimate_norm,
            comparison.overall_reference_norm,
            comparison.cosine,
            comparison.norm_ratio,
            comparison.estimate_norm,
            comparison.reference_norm,
        )
        return jtu.tree_map(lambda a: a.astype(self.dtype), metrics)

    def _nan_metrics(self, params: Any) -> tuple:
        nan = jnp.full((), jnp.nan, self.dtype)
        per_leaf = jtu.tree_map(lambda _: nan, params)
        return (nan, nan, nan, nan, per_leaf, per_leaf, per_leaf, per_leaf)

    def result(self, metrics: Any, paths: tuple[str, ...], sizes: tuple[int, ...]) -> Fidelity:
        """The `Fidelity` record: the measured updates' rows of the per-update metrics."""
        updates = self.config.measured(self.updates())
        index = np.asarray(updates, dtype=int)
        rows = jtu.tree_map(lambda a: a[index], metrics)
        c = self.steps_per_update
        steps = [min((u + 1) * c, self.length) - 1 for u in updates]
        return Fidelity(
            update=jnp.asarray(index, jnp.int32),
            step=jnp.asarray(steps, jnp.int32),
            overall_cosine=rows[0],
            overall_norm_ratio=rows[1],
            overall_estimate_norm=rows[2],
            overall_reference_norm=rows[3],
            cosine=rows[4],
            norm_ratio=rows[5],
            estimate_norm=rows[6],
            reference_norm=rows[7],
            paths=paths,
            sizes=sizes,
            reference=self.config.reference,
            window=self.config.window_updates,
            samples=self.samples_measured,
        )

    @property
    def samples_measured(self) -> int:
        return 1 if self.samples is None else self.samples


def _take(tree: Any, axis: int, k: int) -> Any:
    return jtu.tree_map(lambda a: jax.lax.slice_in_dim(a, 0, k, axis=axis), tree)


def setup_monitor(
    config: Any,
    online_step: Callable,
    objective: Any,
    params: Any,
    state: Any,
    trace: Any,
    block_size: int | None,
    static: Any,
    rule: AbstractAlgorithm | None,
) -> Monitor:
    """Checks `config` against this call of `train_online` and sets the monitor up: the
    sub-batch, the reference's steps, the fresh trace of a window."""
    from ._algorithms._rtrl import RTRL
    from ._drivers import make_forward_step, make_online_step

    if not isinstance(config, FidelityMonitor):
        raise TypeError(
            "train_online: `monitor` must be an `eqtrace.FidelityMonitor` (e.g. "
            f"`FidelityMonitor(every=10)`) or None, but received {config!r}."
        )
    if static is None or rule is None:
        raise TypeError(
            "train_online: the fidelity monitor runs the model's own forward step for its "
            "reference, so `online_step` must come from `eqtrace.make_online_step` or "
            "`eqtrace.make_online_block` (vmapped or jitted as you like), but received a "
            "function they did not make. Build the step with them, or drop `monitor`."
        )
    model = eqx.combine(params, static)
    batch = _batch_size(model, state)
    if batch is None:
        if config.samples not in (None, 1):
            raise ValueError(
                f"train_online: `FidelityMonitor(samples={config.samples})` asks for a "
                "sub-batch larger than the batch: the state has no batch axis (one sequence). "
                "Pass `samples=1` or leave it out, or train on a batch "
                "(`init_state_and_trace(..., batch_size=B)`)."
            )
        samples = None
    else:
        samples = min(DEFAULT_SAMPLES, batch) if config.samples is None else config.samples
        if samples > batch:
            raise ValueError(
                f"train_online: `FidelityMonitor(samples={config.samples})` asks for a "
                f"sub-batch larger than the batch: the state and trace hold {batch} samples. "
                f"Pass `samples` <= {batch}, or leave it out (at most {DEFAULT_SAMPLES} "
                "samples, never more than the batch)."
            )
    xs, targets, weights = objective.sequences
    if samples is not None:
        targets_axis = 1
        sequence_targets = objective.sequence_targets
        for name, tree, axis in (
            ("targets", targets, targets_axis),
            ("targets", sequence_targets, 0),
            ("xs", xs, 1),
        ):
            for path, leaf in jtu.tree_leaves_with_path(tree):
                if jnp.ndim(leaf) <= axis or jnp.shape(leaf)[axis] != batch:
                    raise ValueError(
                        f"train_online: the monitor measures the first {samples} samples of "
                        f"the batch of {batch}, so it needs every leaf of `{name}` to hold the "
                        f"batch along axis {axis}, but `{name}{jtu.keystr(path)}` has the "
                        f"shape {jnp.shape(leaf)}. Lay the batch out along that axis, or drop "
                        "`monitor`."
                    )
        objective = dataclasses.replace(
            objective,
            sequence_targets=None
            if sequence_targets is None
            else _take(sequence_targets, 0, samples),
        )
        sequences = (_take(xs, 1, samples), _take(targets, 1, samples), weights)
    else:
        sequences = objective.sequences

    def vmapped(function, in_axes):
        return function if samples is None else jax.vmap(function, in_axes=in_axes)

    def sub(tree):
        return tree if samples is None else _take(tree, 0, samples)

    forward_step = vmapped(make_forward_step(static), (None, 0, 0))
    rtrl_step, rtrl_trace = None, None
    example = jtu.tree_map(lambda a: a[0] if samples is None else a[0, 0], xs)
    single_state = model.init_state()
    if config.reference == "rtrl":
        rtrl = RTRL()
        rtrl_step = vmapped(make_online_step(rtrl, static), (None, 0, 0, 0))
        one = rtrl.init_trace(model, single_state, example)
        rtrl_trace = one if samples is None else _broadcast(one, samples)

    # The fresh trace of a window, made once (the rule analyses the model to make it).
    fresh = rule.init_trace(model, single_state, example)
    if samples is not None:
        fresh = _broadcast(fresh, samples)

    def init_trace(keys):
        leaves, treedef = jtu.tree_flatten(fresh)
        replaced = iter(keys)
        # The rule's PRNG keys (UORO) are the carried ones: fresh draws, not the initial key.
        leaves = [next(replaced) if is_key(leaf) else leaf for leaf in leaves]
        return jtu.tree_unflatten(treedef, leaves)

    floating = [leaf for leaf in jtu.tree_leaves(params) if eqx.is_inexact_array(leaf)]
    dtype = jnp.finfo(jnp.result_type(*floating) if floating else float).dtype
    length = jtu.tree_leaves(xs)[0].shape[0] if jtu.tree_leaves(xs) else 0
    return Monitor(
        config=config,
        objective=objective,
        sequences=sequences,
        online_step=online_step,
        rule=rule,
        forward_step=forward_step,
        rtrl_step=rtrl_step,
        rtrl_trace=rtrl_trace,
        init_trace=init_trace,
        sub=sub,
        block_size=block_size,
        length=length,
        samples=samples,
        dtype=dtype,
    )


def _broadcast(tree: Any, samples: int) -> Any:
    def batch(a):
        if is_key(a):
            return jax.random.split(a, samples)
        return jnp.broadcast_to(a, (samples, *a.shape))

    return jtu.tree_map(batch, tree)


def leaf_paths(params: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The paths and sizes of the array leaves of `params`, as `compare_gradients` names them."""
    leaves = [
        (jtu.keystr(path), int(np.prod(jnp.shape(leaf), dtype=int)))
        for path, leaf in jtu.tree_leaves_with_path(params)
    ]
    return tuple(p for p, _ in leaves), tuple(s for _, s in leaves)
