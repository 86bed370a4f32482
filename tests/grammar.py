"""A small grammar of random recurrent cells and networks, for the generated oracle tests.

A drawn *spec* (frozen dataclasses: hashable, and printed in full by hypothesis when an example
fails) says what to build, and `build_network(spec, key)` builds it. Generated cells are
written the way a user writes one (docs/custom_cells.md): plain Equinox parts, synaptic ops
held as fields, element-wise arithmetic everywhere else, sizes as static fields. Within that
style the grammar varies what the library must not depend on: the order in which op fields
are declared (independent of the order the ops are called in), activations held as ordinary
fields, fused ops split into gates, an op used twice, one or two state leaves (in a tuple, a
list, a dict or a named tuple), per-neuron and small shared parameters. A few cells break a
structure rule on purpose (`CellSpec.violation`), so that refusals are exercised too.

Networks are `eqtrace.nn.Sequential`s of one to three cells (built-in or generated) with
stateless layers of every kind between and around them, or a single cell used bare.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import eqtrace
from eqtrace import nn


def _identity(x):
    return x


#: Element-wise functions a cell applies to op inputs and to its neurons' drive.
ACTIVATIONS: dict[str, Callable] = {
    "identity": _identity,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "sin": jnp.sin,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
}


@jax.custom_jvp
def _box_spike(z, width):
    """A user's rectangular surrogate: a step, with derivative `1/w` on `|z| < w/2`."""
    return (z > 0).astype(z.dtype)


@_box_spike.defjvp
def _box_spike_jvp(primals, tangents):
    z, width = primals
    slope = jnp.where(jnp.abs(z) < width / 2, 1 / width, 0.0)
    return _box_spike(z, width), slope * tangents[0]


#: Gates whose derivative is non-zero only on a band of width `w` around zero, applied to
#: leaf 0's drive minus a per-neuron centre (`BandSpec`).
BANDS: dict[str, Callable] = {
    "clip": lambda z, w: jnp.clip(z, -w / 2, w / 2),
    "window": lambda z, w: jnp.where((z > -w / 2) & (z < w / 2), z, 0.0),
    "threshold": lambda z, w: jnp.where(z > -w / 4, z, 0.0),
    "hard-sigmoid": lambda z, w: jnp.clip(z / w + 0.5, 0.0, 1.0),
    "piecewise": lambda z, w: jnp.minimum(jax.nn.relu(z + w / 2), w),
    "box-surrogate": _box_spike,
    "triangle-surrogate": lambda z, w: nn.surrogate.triangle(z, width=w),
}


@dataclasses.dataclass(frozen=True)
class BandSpec:
    """A narrow gate on leaf 0's drive: `BANDS[kind](drive - centre, width)`. With `inside`, the
    generated tests set the per-neuron centre to the drive of the first step, so the example
    starts inside the band; otherwise the centre is random (and the drive mostly outside)."""

    kind: str
    width: float
    inside: bool


#: Op kinds taking a float vector; token cells use "embedding" for their input.
DENSE_OPS = ("linear", "masked", "eqx", "eqx-nobias")

#: How a state leaf is updated from its drive `z` (a sum of op-output chunks):
#: "leaky" `h' = λ ⊙ h + f(z)`, "gated" `h' = g ⊙ h + (1 − g) ⊙ f(z)` with `g = σ(gate chunks)`,
#: "plain" `h' = f(z + h / 2)`.
LEAF_RULES = ("leaky", "gated", "plain")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input of an op: `x`, the previous state leaf `h<k>`, or `x` concatenated with `h0`
    ("xh0"), passed through an activation."""

    what: str
    activation: str


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A synaptic op with `width * hidden` outputs, split into `width` per-neuron chunks. It is
    applied once per source and the results summed (two sources: an op used twice)."""

    kind: str
    width: int
    sources: tuple[Source, ...]


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    rule: str
    activation: str


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """A generated cell.

    - `input_size`: the length of `x`, or the vocabulary size if `tokens` (`x` is an integer).
    - `ops`: in call order; the field of the `i`-th op called is `op<i>`.
    - `declaration`: the order in which the op fields are declared.
    - `chunk_slots`: for each chunk of the ops' outputs (in call order), the state leaf and the
      slot ("drive" or "gate") it is added to.
    - `per_neuron`: a `(hidden,)` parameter: leaf 0's decay logits if it is leaky, else a bias.
    - `shared`: 0, or a shared parameter of 1 (a scalar gain on leaf 0's drive) or 2 values
      (gain and offset).
    - `output`: "state" (one leaf), or "h0", "h1" or "mix" (`h0 ⊙ tanh(h1)`) for two.
    - `functions_as_fields`: whether activations are held as ordinary (non-static) fields.
    - `violation`: None, "roll" (neighbours mix outside any op), "scaled-input" (the shared
      parameter scales the input of the first dense op) or "cond" (the first op is called in
      a `lax.cond` branch).
    - `container`: how two or more leaves are held: a "tuple", a "list", a "dict" (keys `h0`,
      `h1`) or a "namedtuple".
    """

    input_size: int
    hidden: int
    tokens: bool
    ops: tuple[OpSpec, ...]
    declaration: tuple[int, ...]
    leaves: tuple[LeafSpec, ...]
    chunk_slots: tuple[tuple[int, str], ...]
    per_neuron: bool
    shared: int
    output: str
    functions_as_fields: bool
    violation: str | None
    container: str = "tuple"
    #: A narrow gate on leaf 0's drive, or None.
    band: BandSpec | None = None
    #: Whether the first op's output is permuted by a fixed gather before it is split.
    permute: bool = False
    #: Whether leaf 0's update passes through a `lax.cond` on the previous state (element-wise
    #: in either branch).
    cond_gate: bool = False

    @property
    def elementwise_recurrence(self) -> bool:
        """Whether no op input depends on the state and no rule is broken: D-RTRL is exact."""
        sources = (s for op in self.ops for s in op.sources)
        return self.violation is None and all(s.what == "x" for s in sources)

    def source_size(self, what: str) -> int:
        return {"x": self.input_size, "xh0": self.input_size + self.hidden}.get(what, self.hidden)


class TwoLeaves(NamedTuple):
    """A state of two leaves as a user's named tuple."""

    h0: jax.Array
    h1: jax.Array


class GeneratedCell(eqtrace.AbstractCell):
    """A user cell that carries out `spec`. Its ops are the fields `op0, op1, …` (numbered in
    call order), declared by the subclass `cell_class` makes, in `spec.declaration` order."""

    per_neuron: jax.Array | None
    shared: jax.Array | None
    functions: dict[str, Callable] | None
    band_centre: jax.Array | None
    spec: CellSpec = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    input_size: int | None = eqx.field(static=True)

    def init_state(self):
        return self._pack([jnp.zeros(self.hidden_size)] * len(self.spec.leaves))

    def _pack(self, leaves: list) -> Any:
        """The state holding `leaves`, in the spec's container."""
        if len(leaves) == 1:
            return leaves[0]
        container = self.spec.container
        if container == "dict":
            return {f"h{k}": leaf for k, leaf in enumerate(leaves)}
        if container == "namedtuple":
            return TwoLeaves(*leaves)
        return list(leaves) if container == "list" else tuple(leaves)

    def _unpack(self, state) -> tuple:
        if len(self.spec.leaves) == 1:
            return (state,)
        if self.spec.container == "dict":
            return tuple(state[f"h{k}"] for k in range(len(self.spec.leaves)))
        return tuple(state)

    def __call__(self, state, x):
        spec = self.spec
        leaves = self._unpack(state)
        chunks = self._chunks(leaves, x)
        new = []
        for k, (leaf, previous) in enumerate(zip(spec.leaves, leaves)):
            drive, gate = (self._slot(chunks, (k, slot)) for slot in ("drive", "gate"))
            if k == 0:
                drive = self._modulate(drive, leaky=leaf.rule == "leaky")
                if spec.violation == "roll":
                    drive = drive + 0.5 * jnp.roll(previous, 1)
                if spec.band is not None:
                    drive = BANDS[spec.band.kind](drive - self.band_centre, spec.band.width)
            else:
                drive = drive + new[k - 1]  # element-wise coupling, as a synaptic current
            f = self._function(leaf.activation)
            if leaf.rule == "leaky":
                decay = 0.5
                if k == 0 and self.per_neuron is not None:
                    decay = jax.nn.sigmoid(self.per_neuron)
                value = decay * previous + f(drive)
            elif leaf.rule == "gated":
                g = jax.nn.sigmoid(gate)
                value = g * previous + (1 - g) * f(drive)
            else:
                value = f(drive + 0.5 * previous)
            if k == 0 and spec.cond_gate:
                value = jax.lax.cond(
                    jnp.sum(previous) > 0, lambda v: v, lambda v: 0.5 * jnp.tanh(v), value
                )
            new.append(value)
        new_state = self._pack(new)
        return new_state, self.output(new_state)

    def band_drive(self, state, x):
        """Leaf 0's drive just before its band gate (where `inside` centres the band)."""
        leaves = self._unpack(state)
        drive = self._slot(self._chunks(leaves, x), (0, "drive"))
        drive = self._modulate(drive, leaky=self.spec.leaves[0].rule == "leaky")
        if self.spec.violation == "roll":
            drive = drive + 0.5 * jnp.roll(leaves[0], 1)
        return drive

    def _chunks(self, leaves, x):
        spec = self.spec
        chunks = []
        for i, op_spec in enumerate(spec.ops):
            inputs = [self._source(source, leaves, x) for source in op_spec.sources]
            if spec.violation == "scaled-input" and i == _first_dense(spec):
                inputs[0] = self._gain() * inputs[0]
            op = getattr(self, f"op{i}")
            if spec.violation == "cond" and i == 0:
                # Called in a branch of a `lax.cond` (on the state): its calls are not the step's.
                u = jax.lax.cond(
                    jnp.all(jnp.isfinite(leaves[0])),
                    lambda: sum(op(a) for a in inputs),
                    lambda: jnp.zeros(op_spec.width * self.hidden_size),
                )
            else:
                u = sum(op(a) for a in inputs)
            if spec.permute and i == 0:
                # A fixed permutation (a gather with constant indices): owners move, not mix.
                size = op_spec.width * self.hidden_size
                u = u[jnp.asarray(np.roll(np.arange(size)[::-1], 1))]
            chunks.extend(jnp.split(u, op_spec.width))
        return chunks

    def output(self, state):
        if self.spec.output == "state":
            return state
        leaves = self._unpack(state)
        if self.spec.output == "mix":
            return leaves[0] * jnp.tanh(leaves[1])
        return leaves[int(self.spec.output[1:])]

    def _function(self, name: str) -> Callable:
        return ACTIVATIONS[name] if self.functions is None else self.functions[name]

    def _source(self, source: Source, leaves, x):
        if source.what == "x":
            value = x
        elif source.what == "xh0":
            value = jnp.concatenate([x, leaves[0]])
        else:
            value = leaves[int(source.what[1:])]
        return self._function(source.activation)(value)

    def _slot(self, chunks, slot):
        parts = [c for c, s in zip(chunks, self.spec.chunk_slots) if s == slot]
        return sum(parts, jnp.zeros(self.hidden_size))

    def _gain(self):
        assert self.shared is not None
        return self.shared if self.shared.ndim == 0 else self.shared[0]

    def _modulate(self, drive, *, leaky: bool):
        """The shared gain (and offset) and, unless it is a decay, the per-neuron bias."""
        if self.shared is not None:
            drive = self._gain() * drive
            if self.shared.ndim == 1:
                drive = drive + self.shared[1]
        if self.per_neuron is not None and not leaky:
            drive = drive + self.per_neuron
        return drive


def _first_dense(spec: CellSpec) -> int | None:
    return next((i for i, op in enumerate(spec.ops) if op.kind != "embedding"), None)


@functools.cache
def cell_class(declaration: tuple[int, ...]) -> type[GeneratedCell]:
    """A final subclass of `GeneratedCell` declaring the op fields in `declaration` order."""
    fields = {f"op{i}": Any for i in declaration}
    return type(
        "GeneratedCell", (GeneratedCell,), {"__annotations__": fields, "__module__": __name__}
    )


def build_op(kind: str, in_size: int, out_size: int, key) -> Any:
    wkey, mkey = jr.split(key)
    if kind == "linear":
        return nn.Linear(in_size, out_size, key=wkey)
    if kind == "masked":
        return nn.Linear(
            in_size, out_size, mask=jr.bernoulli(mkey, 0.7, (out_size, in_size)), key=wkey
        )
    if kind == "eqx":
        return eqx.nn.Linear(in_size, out_size, key=wkey)
    if kind == "eqx-nobias":
        return eqx.nn.Linear(in_size, out_size, use_bias=False, key=wkey)
    assert kind == "embedding"
    return eqx.nn.Embedding(in_size, out_size, key=wkey)


def build_cell(spec: CellSpec, key) -> GeneratedCell:
    okeys = jr.split(key, len(spec.ops) + 2)
    ops = {
        f"op{i}": build_op(op.kind, spec.source_size(op.sources[0].what), op.width * spec.hidden, k)
        for i, (op, k) in enumerate(zip(spec.ops, okeys))
    }
    shared = None
    if spec.shared:
        shape = () if spec.shared == 1 else (2,)
        shared = 1 + 0.3 * jr.normal(okeys[-1], shape)
    names = {s.activation for op in spec.ops for s in op.sources}
    names |= {leaf.activation for leaf in spec.leaves}
    return cell_class(spec.declaration)(
        per_neuron=jr.normal(okeys[-2], (spec.hidden,)) if spec.per_neuron else None,
        shared=shared,
        functions={n: ACTIVATIONS[n] for n in sorted(names)} if spec.functions_as_fields else None,
        band_centre=None if spec.band is None else jnp.zeros(spec.hidden),
        spec=spec,
        hidden_size=spec.hidden,
        input_size=None if spec.tokens else spec.input_size,
        **ops,
    )


class Pointwise(eqx.Module):
    """A custom stateless layer: a callable held as an ordinary field, and a learnable scale."""

    fn: Callable
    scale: jax.Array

    def __call__(self, x):
        return self.fn(self.scale * x)


#: Stateless layers, `(in_size, out_size, key) -> layer`.
STATELESS: dict[str, Callable] = {
    "linear": lambda i, o, key: eqx.nn.Linear(i, o, key=key),
    "function": lambda i, o, key: jnp.tanh,
    "lambda": lambda i, o, key: eqx.nn.Lambda(jax.nn.relu),
    "mlp": lambda i, o, key: eqx.nn.MLP(i, o, width_size=3, depth=1, key=key),
    "sequential": lambda i, o, key: eqx.nn.Sequential(
        [eqx.nn.Linear(i, o, key=key), eqx.nn.Lambda(jnp.tanh)]
    ),
    "pointwise": lambda i, o, key: Pointwise(jnp.sin, jnp.array(1.2)),
}
#: Stateless layers that may change the size of their input.
RESIZING = ("linear", "mlp", "sequential")
#: Stateless layers without parameters.
PARAMETER_FREE = ("function", "lambda")


class Delay(eqtrace.AbstractCell):
    """A user's cell without parameters: the last `length` inputs, a causal window (a delay
    line). Not element-wise (its state shifts), but it has nothing to learn."""

    input_size: int = eqx.field(static=True)
    length: int = eqx.field(static=True)

    def init_state(self):
        return jnp.zeros((self.length, self.input_size))

    def __call__(self, state, x):
        new_state = jnp.concatenate([state[1:], x[None]])
        return new_state, self.output(new_state)

    def output(self, state):
        return state.reshape(-1)


#: Built-in cells, `(in_size, hidden, key, **options) -> cell`.
BUILTIN_CELLS: dict[str, Callable] = {
    "rnn": nn.RNNCell,
    "gru": nn.GRUCell,
    "lstm": nn.LSTMCell,
    "mingru": nn.MinGRUCell,
    "lru": nn.LRUCell,
    "lif": nn.LIF,
    "alif": nn.ALIF,
    "readout": nn.LeakyReadout,
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer: a built-in cell (`options` are its keyword arguments), "generated" (`cell`), or
    a stateless layer (a key of `STATELESS`)."""

    kind: str
    in_size: int
    out_size: int
    cell: CellSpec | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def is_cell(self) -> bool:
        return self.kind in ("generated", "delay") or self.kind in BUILTIN_CELLS

    @property
    def parameter_free(self) -> bool:
        return self.kind in PARAMETER_FREE or self.kind == "delay"

    @property
    def elementwise_recurrence(self) -> bool:
        if self.cell is not None:
            return self.cell.elementwise_recurrence
        return self.kind in ("mingru", "lru", "readout") or (
            self.kind in ("lif", "alif") and not dict(self.options)["recurrent"]
        )


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A network; `bare`: its only layer, a cell, used directly (not in a `Sequential`)."""

    layers: tuple[LayerSpec, ...]
    bare: bool

    @property
    def tokens(self) -> bool:
        first = self.layers[0].cell
        return first is not None and first.tokens

    @property
    def drtrl_exact(self) -> bool:
        """Whether D-RTRL equals BPTT by theory: one element-wise-recurrent cell with
        parameters, nothing with parameters before it (whose temporal credit would be dropped)
        and nothing with a state after it (stateless read-outs)."""
        return self._exact_after(1)

    @property
    def eprop_exact(self) -> bool:
        """Whether e-prop equals BPTT by theory: where D-RTRL does, or for one
        element-wise-recurrent cell (nothing with parameters before it) followed directly by a
        leaky read-out, then stateless layers."""
        return self.drtrl_exact or (
            self._exact_after(2) and self.layers[self._learnt_cells()[1]].kind == "readout"
        )

    def _learnt_cells(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.is_cell and layer.kind != "delay"]

    def _exact_after(self, count: int) -> bool:
        """`count` adjacent learnt cells, the first element-wise, parameter-free layers before
        them and stateless layers after them."""
        learnt = self._learnt_cells()
        if len(learnt) != count or learnt[-1] != learnt[0] + count - 1:
            return False
        first, last = learnt[0], learnt[-1]
        return (
            self.layers[first].elementwise_recurrence
            and all(layer.parameter_free for layer in self.layers[:first])
            and not any(layer.is_cell for layer in self.layers[last + 1 :])
        )


def build_layer(spec: LayerSpec, key) -> Any:
    if spec.kind == "generated":
        assert spec.cell is not None
        return build_cell(spec.cell, key)
    if spec.kind == "delay":
        return Delay(spec.in_size, spec.out_size // spec.in_size)
    if spec.kind in BUILTIN_CELLS:
        hidden = dict(spec.options).get("hidden", spec.out_size)
        options = {k: v for k, v in spec.options if k != "hidden"}
        return BUILTIN_CELLS[spec.kind](spec.in_size, hidden, key=key, **options)
    return STATELESS[spec.kind](spec.in_size, spec.out_size, key)


def build_network(spec: NetworkSpec, key) -> eqtrace.AbstractCell:
    layers = [
        build_layer(layer, k) for layer, k in zip(spec.layers, jr.split(key, len(spec.layers)))
    ]
    return layers[0] if spec.bare else nn.Sequential(layers)


# Strategies.

_sizes = st.integers(2, 4)
_activations = st.sampled_from(sorted(ACTIVATIONS))


band_specs = st.builds(
    BandSpec,
    kind=st.sampled_from(sorted(BANDS)),
    width=st.sampled_from([0.01, 0.05, 0.1]),
    inside=st.booleans(),
)


@st.composite
def cell_specs(draw, input_size: int, *, tokens: bool = False) -> CellSpec:
    """A generated cell taking `input_size` inputs (a vocabulary, if `tokens`)."""
    hidden = draw(_sizes)
    leaves = tuple(
        LeafSpec(draw(st.sampled_from(LEAF_RULES)), draw(_activations))
        for _ in range(draw(st.integers(1, 2)))
    )
    state_sources = [f"h{k}" for k in range(len(leaves))]
    feedforward = draw(st.booleans())  # op inputs from `x` only: an element-wise recurrence
    whats = ["x"] if feedforward else ["x", *state_sources] + ([] if tokens else ["xh0"])
    sizes = {"x": input_size, "xh0": input_size + hidden, **dict.fromkeys(state_sources, hidden)}

    def source(what: str) -> Source:
        if tokens and what == "x":
            return Source("x", "identity")
        return Source(what, draw(_activations))

    ops = []
    for i in range(draw(st.integers(1, 3))):
        what = "x" if i == 0 else draw(st.sampled_from(whats))  # every cell reads its input
        sources = [source(what)]
        if draw(st.integers(0, 9)) == 9:  # used twice: on an input of the same size
            same_size = [
                w
                for w in whats
                if sizes[w] == sizes[what] and not (tokens and (w == "x") != (what == "x"))
            ]
            sources.append(source(draw(st.sampled_from(same_size))))
        kind = "embedding" if tokens and what == "x" else draw(st.sampled_from(DENSE_OPS))
        ops.append(OpSpec(kind, draw(st.integers(1, 3)), tuple(sources)))
    slots = [(k, "drive") for k in range(len(leaves))]
    slots += [(k, "gate") for k, leaf in enumerate(leaves) if leaf.rule == "gated"]
    chunk_slots = tuple(draw(st.sampled_from(slots)) for op in ops for _ in range(op.width))
    shared = draw(st.integers(0, 2))
    violation = draw(st.sampled_from([None] * 8 + ["roll", "scaled-input", "cond"]))
    if violation == "scaled-input":
        if all(op.kind == "embedding" for op in ops):
            violation = None
        else:
            shared = max(shared, 1)
    output = "state" if len(leaves) == 1 else draw(st.sampled_from(["h0", "h1", "mix"]))
    return CellSpec(
        input_size=input_size,
        hidden=hidden,
        tokens=tokens,
        ops=tuple(ops),
        declaration=tuple(draw(st.permutations(range(len(ops))))),
        leaves=leaves,
        chunk_slots=chunk_slots,
        per_neuron=draw(st.booleans()),
        shared=shared,
        output=output,
        functions_as_fields=draw(st.booleans()),
        violation=violation,
        container=draw(st.sampled_from(["tuple", "list", "dict", "namedtuple"]))
        if len(leaves) == 2
        else "tuple",
        band=draw(st.none() | band_specs),
        permute=draw(st.integers(0, 3)) == 3,
        cond_gate=draw(st.integers(0, 3)) == 3,
    )


@st.composite
def builtin_cell_specs(draw, input_size: int) -> LayerSpec:
    kind = draw(st.sampled_from(sorted(BUILTIN_CELLS)))
    hidden = draw(_sizes)
    options: dict[str, Any] = {}
    out_size = hidden
    if kind == "lru":
        out_size = draw(_sizes)
        options = {"hidden": hidden, "output_size": out_size}
    elif kind in ("lif", "alif"):
        options = {
            "recurrent": draw(st.booleans()),
            "synapse": draw(st.booleans()),
            "reset": draw(st.sampled_from(["subtract", "zero"])),
            "learn_tau": draw(st.booleans()),
            "threshold": 0.5,
            "tau_mem": 5.0,
        }
        if kind == "alif":
            options["learn_beta"] = draw(st.booleans())
    return LayerSpec(kind, input_size, out_size, options=tuple(sorted(options.items())))


@st.composite
def stateless_specs(draw, in_size: int) -> LayerSpec:
    kind = draw(st.sampled_from(sorted(STATELESS)))
    return LayerSpec(kind, in_size, draw(_sizes) if kind in RESIZING else in_size)


@st.composite
def network_specs(draw) -> NetworkSpec:
    """One to three cells (mostly one or two, to keep compile times down; a generated cell
    reading tokens only first) with zero or one stateless layer before each and up to two
    after the last."""
    tokens = draw(st.integers(0, 4)) == 4
    size = draw(_sizes)
    layers: list[LayerSpec] = []
    for c in range(draw(st.sampled_from([1, 1, 2, 2, 3]))):
        if not (tokens and c == 0) and draw(st.booleans()):
            layers.append(draw(stateless_specs(size)))
            size = layers[-1].out_size
        if not (tokens and c == 0) and draw(st.integers(0, 5)) == 5:
            # A cell without parameters (a delay line of 2 steps).
            layers.append(LayerSpec("delay", size, 2 * size))
            size = 2 * size
        if (tokens and c == 0) or draw(st.booleans()):
            cell = draw(cell_specs(size, tokens=tokens and c == 0))
            layers.append(LayerSpec("generated", size, cell.hidden, cell=cell))
        else:
            layers.append(draw(builtin_cell_specs(size)))
        size = layers[-1].out_size
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        layers.append(draw(stateless_specs(size)))
        size = layers[-1].out_size
    bare = len(layers) == 1 and draw(st.booleans())
    return NetworkSpec(tuple(layers), bare)
