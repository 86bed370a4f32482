"""`eqtrace.compare_gradients`: exactly 1 where a rule is exact, below 1 where it is not, the
zero-norm conventions, the table, and the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt


def _sequence(key, length, input_size, output_size):
    xkey, tkey = jr.split(key)
    return jr.normal(xkey, (length, input_size)), jr.normal(tkey, (length, output_size))


def _assert_equal_gradients(comparison):
    for value in jtu.tree_leaves((comparison.cosine, comparison.norm_ratio)):
        assert abs(float(value) - 1) <= 1e-12
    assert abs(float(comparison.overall_cosine) - 1) <= 1e-12
    assert abs(float(comparison.overall_norm_ratio) - 1) <= 1e-12


def test_rtrl_against_bptt_is_exactly_one(getkey):
    model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = _sequence(getkey(), 6, 3, 2)
    online, bptt = online_and_bptt(eqtrace.RTRL(), model, xs, targets)
    comparison = eqtrace.compare_gradients(online, bptt)
    _assert_equal_gradients(comparison)
    assert jtu.tree_structure(comparison.cosine) == jtu.tree_structure(online)
    assert "cosine 1 and ratio 1 for every parameter: equal" in str(comparison)


@pytest.mark.parametrize(
    "cell",
    [lambda k: nn.MinGRUCell(3, 4, key=k), lambda k: nn.LIF(3, 4, key=k)],
    ids=["mingru", "lif"],
)
def test_drtrl_against_bptt_on_an_elementwise_layer_is_exactly_one(cell, getkey):
    # No recurrent weights: D-RTRL's diagonal trace is exact, with a read-out on top.
    model = nn.Sequential([cell(getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = _sequence(getkey(), 7, 3, 2)
    online, bptt = online_and_bptt(eqtrace.DRTRL(), model, 3 * xs, targets)
    _assert_equal_gradients(eqtrace.compare_gradients(online, bptt))


def test_drtrl_against_bptt_with_recurrent_weights_is_below_one(getkey):
    model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = _sequence(getkey(), 7, 3, 2)
    online, bptt = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    comparison = eqtrace.compare_gradients(online, bptt)
    assert float(comparison.overall_cosine) < 1 - 1e-6
    gru = comparison.cosine.layers[0]
    assert float(gru.recurrent_op.weight) < 1 - 1e-6
    # The read-out's gradient is exact: it does not go through the trace.
    assert abs(float(comparison.cosine.layers[1].weight) - 1) <= 1e-12
    assert abs(float(comparison.norm_ratio.layers[1].weight) - 1) <= 1e-12
    assert "equal" not in str(comparison).splitlines()[-1]


def test_known_values():
    e = {
        "same": jnp.array([1.0, 2.0]),
        "double": jnp.array([2.0, 0.0]),
        "ortho": jnp.array([0.0, 3.0]),
    }
    r = {
        "same": jnp.array([1.0, 2.0]),
        "double": jnp.array([1.0, 0.0]),
        "ortho": jnp.array([1.0, 0.0]),
    }
    c = eqtrace.compare_gradients(e, r)
    assert float(c.cosine["same"]) == pytest.approx(1.0, abs=1e-15)
    assert float(c.norm_ratio["double"]) == pytest.approx(2.0, rel=1e-15)
    assert float(c.cosine["ortho"]) == 0.0
    assert float(c.norm_ratio["ortho"]) == pytest.approx(3.0, rel=1e-15)
    flat_e, flat_r = np.array([1.0, 2.0, 2.0, 0.0, 0.0, 3.0]), np.array([1, 2, 1, 0, 1, 0.0])
    # The overall values are over all leaves concatenated (in leaf order).
    cosine = flat_e @ flat_r / np.linalg.norm(flat_e) / np.linalg.norm(flat_r)
    assert float(c.overall_cosine) == pytest.approx(cosine, rel=1e-14)
    ratio = np.linalg.norm(flat_e) / np.linalg.norm(flat_r)
    assert float(c.overall_norm_ratio) == pytest.approx(ratio, rel=1e-14)
    assert float(c.reference_norm["double"]) == 1.0
    opposite = eqtrace.compare_gradients(jnp.array([-1.0, -2.0]), jnp.array([1.0, 2.0]))
    assert float(opposite.overall_cosine) == -1.0
    assert "opposes the reference" in str(opposite)
    assert "not a descent direction" in str(opposite)


def test_zero_norms():
    zeros, ones = jnp.zeros(3), jnp.ones(3)
    both = eqtrace.compare_gradients(zeros, zeros)
    assert float(both.overall_cosine) == 1.0 and float(both.overall_norm_ratio) == 1.0
    assert "both zero" in str(both)
    reference_zero = eqtrace.compare_gradients(ones, zeros)
    assert np.isnan(float(reference_zero.overall_cosine))
    assert float(reference_zero.overall_norm_ratio) == np.inf
    assert "reference is zero" in str(reference_zero)
    estimate_zero = eqtrace.compare_gradients(zeros, ones)
    assert float(estimate_zero.overall_cosine) == 0.0
    assert float(estimate_zero.overall_norm_ratio) == 0.0
    assert "estimate is zero" in str(estimate_zero)
    # An empty leaf counts as zero on both sides.
    empty = eqtrace.compare_gradients(jnp.zeros((0, 2)), jnp.zeros((0, 2)))
    assert float(empty.overall_cosine) == 1.0 and float(empty.overall_norm_ratio) == 1.0


def test_one_zero_leaf_among_others_is_named_in_the_table():
    e = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5, 0.0])}
    r = {"a": jnp.array([1.0, 2.0]), "b": jnp.zeros(2)}
    c = eqtrace.compare_gradients(e, r)
    assert float(c.cosine["a"]) == 1.0 and np.isnan(float(c.cosine["b"]))
    # The overall values stay defined: the reference as a whole is not zero.
    assert 0 < float(c.overall_cosine) < 1 and np.isfinite(float(c.overall_norm_ratio))
    row = next(line for line in str(c).splitlines() if "['b']" in line)
    assert "nan" in row and "inf" in row and "reference is zero" in row


def test_extreme_scales_neither_overflow_nor_underflow():
    direction = jnp.array([3.0, -4.0, 12.0])
    # (XLA flushes subnormal floats to zero: stay above 2.2e-308.)
    for big, small in [(1e300, 1e-5), (1e-290, 1e-300), (1e200, 1e200), (1e300, 1e-300)]:
        c = eqtrace.compare_gradients(big * direction, small * direction)
        assert float(c.overall_cosine) == pytest.approx(1.0, abs=1e-14)
        # A ratio of 1e600 is not a float64: inf.
        assert float(c.overall_norm_ratio) == pytest.approx(big / small, rel=1e-12)
    # float32 leaves stay float32, and squares of 1e30 do not overflow.
    c = eqtrace.compare_gradients(
        1e30 * direction.astype(jnp.float32), direction.astype(jnp.float32)
    )
    assert c.overall_cosine.dtype == jnp.float32
    assert float(c.overall_norm_ratio) == pytest.approx(1e30, rel=1e-6)


def test_none_leaves_stay_none(getkey):
    model = nn.GRUCell(3, 4, key=getkey())
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    # Freeze the biases: the gradients of a partition of the parameters have `None` there.
    frozen = lambda tree: eqx.tree_at(  # noqa: E731
        lambda m: (m.input_op.bias, m.recurrent_op.bias), tree, replace=(None, None)
    )
    grads = frozen(params)
    c = eqtrace.compare_gradients(grads, jtu.tree_map(lambda a: 2 * a, grads))
    assert c.cosine.input_op.bias is None and c.norm_ratio.recurrent_op.bias is None
    assert float(c.cosine.input_op.weight) == pytest.approx(1.0, abs=1e-15)
    assert float(c.overall_norm_ratio) == pytest.approx(0.5, rel=1e-15)
    assert c.paths == (".input_op.weight", ".recurrent_op.weight")


def test_table_lists_every_leaf_path_and_the_overall_row(getkey):
    model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    noisy = jtu.tree_map(lambda a: a + 0.1, params)
    text = str(eqtrace.compare_gradients(noisy, params))
    lines = text.splitlines()
    for path, leaf in jtu.tree_leaves_with_path(params):
        row = next(line for line in lines if line.strip().startswith(jtu.keystr(path) + " "))
        assert f" {leaf.size} " in row
    assert ".layers[0].recurrent_op.weight" in text
    overall = next(line for line in lines if line.strip().startswith("overall"))
    assert f" {sum(leaf.size for leaf in jtu.tree_leaves(params))} " in overall
    assert lines[-1].startswith("  reading: cosine 0.")


def test_jit_equals_eager(getkey):
    e = {"w": jr.normal(getkey(), (3, 4)), "b": jr.normal(getkey(), (4,)), "none": None}
    r = {"w": jr.normal(getkey(), (3, 4)), "b": jnp.zeros(4), "none": None}
    eager = eqtrace.compare_gradients(e, r)
    jitted = jax.jit(eqtrace.compare_gradients)(e, r)
    for a, b in zip(jtu.tree_leaves(eager), jtu.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)
    assert str(jitted) == str(eager)
    # Inside the transformation `str` cannot read the values, and says so.
    texts = []

    @jax.jit
    def inside(e, r):
        comparison = eqtrace.compare_gradients(e, r)
        texts.append(str(comparison))
        return comparison.overall_cosine

    inside(e, r)
    assert "traced" in texts[0]


def test_error_structures_differ():
    with pytest.raises(
        ValueError, match=r"`reference` has a leaf at `\['b'\]` that `estimate` lacks"
    ):
        eqtrace.compare_gradients({"a": jnp.ones(2)}, {"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"`estimate` has a leaf at `\['c'\]`"):
        eqtrace.compare_gradients({"a": jnp.ones(2), "c": jnp.ones(2)}, {"a": jnp.ones(2)})


def test_error_shapes_differ(getkey):
    model = nn.GRUCell(3, 4, key=getkey())
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    transposed = eqx.tree_at(lambda m: m.recurrent_op.weight, params, params.recurrent_op.weight.T)
    with pytest.raises(ValueError) as error:
        eqtrace.compare_gradients(transposed, params)
    message = str(error.value)
    assert "`.recurrent_op.weight`" in message
    assert "expected (12, 4) (from `reference`), received (4, 12) (in `estimate`)" in message


def test_error_none_in_one_only():
    with pytest.raises(ValueError, match=r"`estimate\['b'\]` is None but `reference\['b'\]` is"):
        eqtrace.compare_gradients(
            {"a": jnp.ones(2), "b": None}, {"a": jnp.ones(2), "b": jnp.ones(3)}
        )


def test_the_reading_never_says_equal_while_a_parameter_differs():
    """The overall row is dominated by the largest gradients: a read-out's weights equal, a
    small leaf 0.4 % off still reads as cosine 1 and ratio 1 overall. The reading must name
    that leaf instead of saying "equal"."""
    reference = {"readout": jnp.full((50, 50), 10.0), "tau": jnp.array([0.3, -0.2])}
    estimate = {"readout": reference["readout"], "tau": reference["tau"] * 1.004}
    comparison = eqtrace.compare_gradients(estimate, reference)
    assert float(comparison.overall_cosine) > 1 - 1e-9
    reading = str(comparison).splitlines()[-1]
    assert "equal" not in reading.replace("ratio 1, but", "")
    assert "1 of 2 parameters differ: `['tau']` (cosine 1.000000, ratio 1.004000)" in reading
    same = str(eqtrace.compare_gradients(reference, reference)).splitlines()[-1]
    assert same == "  reading: cosine 1 and ratio 1 for every parameter: equal (up to round-off)."
    # Not equal overall: the leaves furthest from the reference are named too.
    off = {"readout": -reference["readout"], "tau": reference["tau"]}
    assert "1 of 2 parameters differ, furthest first: `['readout']`" in str(
        eqtrace.compare_gradients(off, reference)
    )
