"""Checkpoints: a run interrupted, saved, restored in a fresh JAX state and resumed is bit for
bit the run that was never interrupted, for every registered rule, stepped and in blocks,
sharded or not (by default each rule stepped or in blocks, rotating, and every rule stepped
and sharded); a writer killed mid-save never damages the last good checkpoint.

The refusals (another algorithm, hyperparameters, model or tree) are triggered in
test_errors.py against the rows of docs/errors.md.
"""

import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import eqtrace
from eqtrace import nn
from helpers import LONG, mse
from registry import ALGORITHMS, TRACE_KINDS


TESTS = Path(__file__).resolve().parent
LENGTH, SPLIT, BATCH, BLOCK = 6, 3, 2, 2


def _model():
    # A LIF layer: of the cells every rule takes, one of the quickest to compile.
    return nn.Sequential([nn.LIF(3, 4, key=jr.key(0)), eqx.nn.Linear(4, 2, key=jr.key(1))])


def _learner(make_algorithm, blocks: bool, batch: int = BATCH):
    """A learner (a spiking layer and a read-out trained online with Adam): the function that
    trains it on a stretch of the stream, and one that builds it afresh as a new process
    would, giving `(model, algorithm, tree)` with `tree` everything to checkpoint."""
    optimizer = optax.adam(0.05)

    def fresh():
        model, algorithm = _model(), make_algorithm()
        params = eqx.filter(model, eqx.is_inexact_array)
        state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
        tree = {
            "params": params,
            "opt_state": optimizer.init(params),
            "state": state,
            "trace": trace,
            "steps": 0,  # a Python int: saved exactly, whatever its size
        }
        return model, algorithm, tree

    model, algorithm, _ = fresh()
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    if blocks:
        block = eqtrace.make_online_block(algorithm, static)
        online = jax.vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))
    else:
        online = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))

    def train(tree, xs, targets):
        params, opt_state, state, trace, _ = eqtrace.train_online(
            online,
            mse,
            optimizer,
            tree["params"],
            tree["opt_state"],
            tree["state"],
            tree["trace"],
            xs,
            targets,
            block_size=BLOCK if blocks else None,
        )
        return {
            "params": params,
            "opt_state": opt_state,
            "state": state,
            "trace": trace,
            "steps": tree["steps"] + len(xs),
        }

    return train, fresh


def _stream(batch: int = BATCH):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((LENGTH, batch, 3))),
        jnp.asarray(rng.standard_normal((LENGTH, batch, 2))),
    )


def _assert_identical(resumed, straight):
    assert jtu.tree_structure(resumed) == jtu.tree_structure(straight)
    for (path, a), b in zip(jtu.tree_leaves_with_path(resumed), jtu.tree_leaves(straight)):
        assert type(a) is type(b), jtu.keystr(path)
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)  # keys have no `==` in NumPy
        assert np.array_equal(a, b), f"{jtu.keystr(path)}: {a} != {b}"
        if isinstance(a, jax.Array):
            assert a.dtype == b.dtype, jtu.keystr(path)


#: One rule per kind of trace leaf by default (`registry.TRACE_KINDS`), stepped or in blocks,
#: rotating; every registered rule both ways under `LONG`.
MODES = {
    f"{case.name}-{'blocks' if blocks else 'steps'}": (case, blocks)
    for i, case in enumerate(ALGORITHMS)
    for blocks in ([False, True] if case.supports_blocks else [False])
    if LONG or (case.name in TRACE_KINDS and (not case.supports_blocks or blocks == bool(i % 2)))
}

#: The rules resumed with the batch sharded over 4 devices: one of each kind of trace leaf
#: (weight-shaped traces, SnAp-n's compact influence with its index arrays, pp-prop's scalar
#: normaliser, UORO's PRNG key); every registered rule under `LONG`.
SHARDED = [case for case in ALGORITHMS if LONG or case.name in ("drtrl", "snapn", "ppprop", "uoro")]

#: The second half of the runs below, in new processes (JAX starts afresh: nothing compiled
#: or cached survives). `_RESUME`, with the devices of this process (a process's arithmetic may
#: depend on how many devices it has, e.g. the batch sum of `eqtrace._batch_sum`): for each
#: mode, the learner saved after the first stretch is restored into one built afresh, trained
#: on the second stretch and saved again. `_SHARDED`, with 4 host devices: the same with the
#: batch sharded over the devices, checked there.
_IMPORTS = """
import sys
sys.path.insert(0, TESTS)
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import eqtrace
import test_checkpoint as tc

xs, targets = tc._stream()
first, second = slice(None, tc.SPLIT), slice(tc.SPLIT, None)
"""
_RESUME = """
for name, (case, blocks) in tc.MODES.items():
    train, fresh = tc._learner(case.make, blocks)
    model, algorithm, like = fresh()
    directory = DIRECTORY + "/" + name
    restored, step = eqtrace.restore_checkpoint(directory, like, algorithm=algorithm, model=model)
    assert step == tc.SPLIT == restored["steps"]
    resumed = train(restored, xs[second], targets[second])
    # In a directory of its own: the test process still holds the first one's writer lock.
    eqtrace.save_checkpoint(
        directory + "-resumed", tc.LENGTH, resumed, algorithm=algorithm, model=model
    )
"""
_SHARDED = """
assert jax.device_count() == 4
mesh = Mesh(jax.devices(), ("batch",))
batched, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())


def shard(tree):
    # The batch axis of state and trace over the devices; the rest replicated.
    def place(leaf, sharding):
        return jax.device_put(leaf, sharding) if isinstance(leaf, jax.Array) else leaf

    def layout(name):
        return batched if name in ("state", "trace") else replicated

    return {
        name: jtu.tree_map(lambda a: place(a, layout(name)), part)
        for name, part in tree.items()
    }


xs, targets = (jax.device_put(a, NamedSharding(mesh, P(None, "batch"))) for a in tc._stream(4))
for case in tc.SHARDED:
    train, fresh = tc._learner(case.make, False, batch=4)
    _, _, tree = fresh()
    straight = train(train(shard(tree), xs[first], targets[first]), xs[second], targets[second])
    model, algorithm, tree = fresh()
    interrupted = train(shard(tree), xs[first], targets[first])
    directory = DIRECTORY + "/sharded-" + case.name
    eqtrace.save_checkpoint(directory, tc.SPLIT, interrupted, algorithm=algorithm, model=model)
    model, algorithm, unsharded = fresh()
    like = shard(unsharded)
    restored, _ = eqtrace.restore_checkpoint(directory, like, algorithm=algorithm, model=model)
    for a, b in zip(jtu.tree_leaves(restored), jtu.tree_leaves(like)):
        if isinstance(b, jax.Array):
            assert a.sharding == b.sharding, (a.sharding, b.sharding)
    resumed = train(restored, xs[second], targets[second])
    tc._assert_identical(resumed, straight)
    # The same checkpoint restores into one device (another layout), with the same values.
    single, _ = eqtrace.restore_checkpoint(directory, unsharded, algorithm=algorithm, model=model)
    for a, b in zip(jtu.tree_leaves(single), jtu.tree_leaves(restored)):
        if isinstance(a, jax.Array):
            assert len(a.sharding.device_set) == 1
    tc._assert_identical(single, restored)
    print("sharded", case.name, "ok", flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """For each mode: the run straight on over both stretches of the stream, and the same run
    saved after the first stretch and resumed in a new process (`_RESUME`).

    **Returns:** `(straight, resumed, sharded)`: dicts of mode -> learner tree, and the
    new process's report of the sharded runs."""
    directory = tmp_path_factory.mktemp("resume")
    xs, targets = _stream()
    first, second = slice(None, SPLIT), slice(SPLIT, None)
    straight, likes = {}, {}
    for name, (case, blocks) in MODES.items():
        train, fresh = _learner(case.make, blocks)
        model, algorithm, tree = fresh()
        interrupted = train(tree, xs[first], targets[first])
        eqtrace.save_checkpoint(
            directory / name, SPLIT, interrupted, algorithm=algorithm, model=model
        )
        straight[name] = train(interrupted, xs[second], targets[second])
        likes[name] = (model, algorithm, tree)
    # The same XLA flags as this process (conftest.py's), so that the resumed runs compile the
    # same programs: resuming must be bit-identical. Both processes run side by side.
    flags = os.environ.get("XLA_FLAGS", "")
    processes = {}
    for part, extra in ((_RESUME, ""), (_SHARDED, " --xla_force_host_platform_device_count=4")):
        script = (_IMPORTS + part).replace("TESTS", repr(str(TESTS)))
        script = script.replace("DIRECTORY", repr(str(directory)))
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(flags + extra).strip())
        processes[part] = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    outputs = {}
    for part, process in processes.items():
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stdout + stderr
        outputs[part] = stdout
    resumed = {}
    for name, (model, algorithm, like) in likes.items():
        resumed[name], step = eqtrace.restore_checkpoint(
            directory / f"{name}-resumed", like, algorithm=algorithm, model=model
        )
        assert step == LENGTH
    return straight, resumed, outputs[_SHARDED]


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_is_bit_identical(mode, runs):
    """Every leaf (parameters, optimiser state, state, trace, step count) of the run resumed in
    a new process equals the uninterrupted run's, bit for bit."""
    straight, resumed, _ = runs
    _assert_identical(resumed[mode], straight[mode])


def test_sharded_resume_is_bit_identical(runs):
    """The batch sharded over 4 host devices, the rules of `SHARDED`, stepped: restored with
    the sharding of `like`, and resumed bit for bit (checked in the new process)."""
    *_, report = runs
    assert report.split() == [w for case in SHARDED for w in ("sharded", case.name, "ok")]


def test_leaves_of_every_kind_round_trip(tmp_path):
    """PRNG keys, NumPy arrays, Python scalars beyond int64, and leaves that are not data."""
    tree = {
        "key": jr.fold_in(jr.key(3), 7),
        "raw_key": jr.PRNGKey(5),
        "numpy": np.arange(6, dtype=np.float32).reshape(2, 3),
        "int8": jnp.arange(3, dtype=jnp.int8),
        "count": 2**70 + 1,
        "rate": 0.1 + 0.2,
        "flag": True,
        "function": jnp.tanh,
    }
    like = {
        "key": jr.key(0),
        "raw_key": jr.PRNGKey(0),
        "numpy": np.zeros((2, 3), np.float32),
        "int8": jnp.zeros(3, jnp.int8),
        "count": 0,
        "rate": 0.0,
        "flag": False,
        "function": jnp.tanh,
    }
    algorithm, model = eqtrace.DRTRL(), nn.LIF(2, 3, key=jr.key(0))
    eqtrace.save_checkpoint(tmp_path, 2**40, tree, algorithm=algorithm, model=model)
    restored, step = eqtrace.restore_checkpoint(tmp_path, like, algorithm=algorithm, model=model)
    assert step == 2**40
    assert jnp.array_equal(jr.key_data(restored["key"]), jr.key_data(tree["key"]))
    assert restored["key"].dtype == tree["key"].dtype
    assert isinstance(restored["numpy"], np.ndarray)
    for name in ("raw_key", "numpy", "int8"):
        assert (
            np.array_equal(restored[name], tree[name]) and restored[name].dtype == tree[name].dtype
        )
    assert restored["count"] == 2**70 + 1 and restored["rate"] == 0.1 + 0.2
    assert restored["flag"] is True and restored["function"] is jnp.tanh


def test_steps_kept_and_chosen(tmp_path):
    algorithm, model = eqtrace.DRTRL(), nn.LIF(2, 3, key=jr.key(0))
    assert eqtrace.latest_checkpoint(tmp_path / "absent") is None
    for step in range(5):
        tree = {"x": jnp.full(2, float(step))}
        eqtrace.save_checkpoint(
            tmp_path, step, tree, algorithm=algorithm, model=model, max_to_keep=2
        )
    assert eqtrace.latest_checkpoint(tmp_path) == 4
    like = {"x": jnp.zeros(2)}
    restored, step = eqtrace.restore_checkpoint(tmp_path, like, algorithm=algorithm, model=model)
    assert step == 4 and restored["x"][0] == 4
    restored, step = eqtrace.restore_checkpoint(
        tmp_path, like, algorithm=algorithm, model=model, step=3
    )
    assert step == 3 and restored["x"][0] == 3
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint of step 1 \(it holds steps \[3, 4\]\)"
    ):
        eqtrace.restore_checkpoint(tmp_path, like, algorithm=algorithm, model=model, step=1)


_hyperparameters = st.tuples(
    st.sampled_from([0.0, 0.5, 0.6, 7 / 9, 0.999999]),  # rank 4 is 0.6, rank 8 is 7/9
    st.booleans(),  # bias_correction
    st.booleans(),  # check_finite
)


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(saved=_hyperparameters, current=_hyperparameters)
def test_any_change_of_hyperparameters_is_named(saved, current):
    """The recorded algorithm differs from another exactly when the two differ, and the
    difference named is a field that differs (pure Python: no checkpoint written)."""
    from eqtrace._checkpoint_metadata import describe, first_difference

    make = lambda d, b, c: eqtrace.PPProp(d, bias_correction=b, check_finite=c)  # noqa: E731
    found = first_difference(
        describe(make(*saved), values=True), describe(make(*current), values=True)
    )
    assert (found is None) == (saved == current)
    if found is not None:
        path, before, now = found
        names = ("decay", "bias_correction", "check_finite")
        index = names.index(path.lstrip("."))
        assert (before, now) == (saved[index], current[index]) and before != now


_KILLED_WRITER = """
import sys
import jax, jax.numpy as jnp
import eqtrace
directory = sys.argv[1]
algorithm, model = eqtrace.DRTRL(), eqtrace.nn.LIF(2, 3, dtype=jnp.float32, key=jax.random.key(0))
tree = lambda step: {"x": jnp.full((2_000_000,), float(step))}  # 16 MB: slow enough to catch
eqtrace.save_checkpoint(directory, 1, tree(1), algorithm=algorithm, model=model)
print("saved", flush=True)
for step in range(2, 1000):
    eqtrace.save_checkpoint(directory, step, tree(step), algorithm=algorithm, model=model)
"""


def test_a_killed_writer_leaves_the_last_good_checkpoint(tmp_path):
    """A process killed (SIGKILL: no clean-up of its own) while writing a checkpoint."""
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "saved\n"
        deadline = time.monotonic() + 120
        while not any("tmp" in p.name for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    partial = [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    completed = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert partial and completed and completed[0] >= 1
    # The partial checkpoint is not listed; the last complete one restores intact.
    algorithm, model = eqtrace.DRTRL(), nn.LIF(2, 3, dtype=jnp.float32, key=jr.key(0))
    like = {"x": jnp.zeros(2_000_000, jnp.float32)}
    latest = eqtrace.latest_checkpoint(tmp_path)
    assert latest == completed[-1]
    restored, step = eqtrace.restore_checkpoint(tmp_path, like, algorithm=algorithm, model=model)
    assert step == latest and bool(jnp.all(restored["x"] == step))
    # Reading deletes nothing; the next writer (the lock died with the killed one) deletes
    # the partial checkpoint.
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == partial
    eqtrace.save_checkpoint(tmp_path, latest + 1, restored, algorithm=algorithm, model=model)
    assert eqtrace.latest_checkpoint(tmp_path) == latest + 1
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]


# Fault tests: other processes in the directory, and damaged step folders. In each, the newest
# complete state restores bit for bit.

_ALGORITHM, _MODEL = eqtrace.DRTRL(), nn.LIF(2, 3, dtype=jnp.float32, key=jr.key(0))


def _state(step: int):
    """A learner's state at `step`: arrays whose every bit depends on the step, and a count."""
    values = jr.normal(jr.key(step), (50_000,), jnp.float32)
    return {"x": values, "key": jr.fold_in(jr.key(1), step), "steps": step}


def _save(directory, step, **options):
    eqtrace.save_checkpoint(
        directory, step, _state(step), algorithm=_ALGORITHM, model=_MODEL, **options
    )


def _restore(directory, step=None):
    restored, saved = eqtrace.restore_checkpoint(
        directory, _state(0), algorithm=_ALGORITHM, model=_MODEL, step=step
    )
    _assert_identical(restored, _state(saved))
    return saved


def _process(script: str, *args: str) -> subprocess.Popen:
    """`script` run in a new Python process, talking over its stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path)),
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    return output


_READER = """
import os, sys, time
import eqtrace
directory, stop = sys.argv[1:]
print("ready", flush=True)
polls = 0
while not os.path.exists(stop):
    eqtrace.latest_checkpoint(directory)  # an error here fails the test (exit code)
    polls += 1
    time.sleep(0.005)
print(polls, flush=True)
"""


def test_a_reader_polling_never_breaks_a_save(tmp_path):
    """An evaluator polling `latest_checkpoint` every 5 ms while the learner saves 15 times:
    every save succeeds, and every poll (the main branch lost about 1 save in 6 at 50 ms)."""
    directory, stop = tmp_path / "run", tmp_path / "stop"
    reader = _process(_READER, str(directory), str(stop))
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
        for step in range(1, 16):
            _save(directory, step)
    finally:
        stop.touch()
        polls = int(_finish(reader))
    assert polls > 15
    assert eqtrace.latest_checkpoint(directory) == 15 and _restore(directory) == 15
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        "13",
        "14",
        "15",
    ]


_WRITER = """
import sys
import test_checkpoint as tc
directory = sys.argv[1]
tc._save(directory, 1)
print("saved", flush=True)
sys.stdin.readline()
for step in range(2, 12):
    tc._save(directory, step)
print("done", flush=True)
sys.stdin.readline()  # alive, and holding the lock, until told to exit
"""


def test_a_second_writer_is_refused(tmp_path):
    """A second process saving into a directory that another is writing is refused with
    `CheckpointLockedError`, naming the writer, while the first keeps saving; once the first
    has exited (its lock goes with it), the second may write there."""
    writer = _process(_WRITER, str(tmp_path))
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "saved\n"
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        # The writer saves ten steps meanwhile, then waits: it holds the lock throughout, so
        # every save here is refused (the writer cannot exit between a check and a save).
        for attempt in range(20):
            with pytest.raises(eqtrace.CheckpointLockedError, match=f"pid {writer.pid} on host"):
                _save(tmp_path, 100 + attempt)
        assert writer.stdout.readline() == "done\n"
        with pytest.raises(eqtrace.CheckpointLockedError, match=f"pid {writer.pid} on host"):
            _save(tmp_path, 200)
    finally:
        assert _finish(writer) == ""  # `communicate` closes its stdin: the writer exits
    assert eqtrace.latest_checkpoint(tmp_path) == 11 and _restore(tmp_path) == 11
    _save(tmp_path, 12)
    assert _restore(tmp_path) == 12


def _names(directory) -> list[str]:
    return sorted((p.name for p in directory.iterdir() if p.name.isdigit()), key=int)


def test_empty_step_folders_are_not_checkpoints(tmp_path):
    """Empty step folders (a partial copy) beside a good checkpoint: not listed, skipped by
    restore (with a warning), and neither counted by `max_to_keep` nor deleted."""
    _save(tmp_path, 1)
    for step in (5, 6, 7):
        (tmp_path / str(step)).mkdir()
    assert eqtrace.latest_checkpoint(tmp_path) == 1
    with pytest.warns(RuntimeWarning, match=r"restored step 1, skipping later ones.*step 7"):
        assert _restore(tmp_path) == 1
    _save(tmp_path, 2)  # with the default max_to_keep=3
    assert _names(tmp_path) == ["1", "2", "5", "6", "7"]
    for step in (8, 9):
        _save(tmp_path, step)
    assert _names(tmp_path) == ["2", "5", "6", "7", "8", "9"]
    assert _restore(tmp_path) == 9


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


#: Damage done to a step folder -> (what the error names, whether it is found without reading
#: the arrays: then the step is not complete, and not counted by `max_to_keep`).
DAMAGE = {
    "no arrays": (
        lambda f: shutil.rmtree(f / "arrays"),
        "`arrays/commit_success.txt` is missing",
        True,
    ),
    "truncated metadata": (
        lambda f: _truncate(f / "metadata" / "metadata"),
        "`metadata/metadata` is not readable JSON",
        True,
    ),
    "truncated array metadata": (
        lambda f: _truncate(f / "arrays" / "_METADATA"),
        "`arrays/_METADATA` is not readable JSON",
        True,
    ),
    "truncated array data": (
        lambda f: _truncate(_largest_file(f / "arrays")),
        "reading its arrays (the files under `arrays/`) failed",
        False,
    ),
    "bit-flipped array data": (
        lambda f: _flip_a_bit(_largest_file(f / "arrays")),
        "the values read for the leaf `['x']` differ from those saved",
        False,
    ),
    "bit-flipped array index": (
        lambda f: _flip_a_bit(f / "arrays" / "array_metadatas" / "process_0"),
        "reading its arrays (the files under `arrays/`) failed",
        False,
    ),
}


@pytest.fixture
def failed_reads():
    """A failed read leaves Orbax's coroutines unawaited, which Python reports when they are
    collected: collected at the end of the test that failed them, not in a later one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnraisableExceptionWarning)
        yield
        gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_step(tmp_path, damage, failed_reads):
    """The latest step damaged: restoring it by number names the step and the file; restoring
    the latest falls back to the newest readable step, bit for bit. A step found incomplete
    without reading its arrays is not counted by `max_to_keep`: the next save keeps the good
    older step."""
    do, named, structural = DAMAGE[damage]
    for step in (1, 2):
        _save(tmp_path, step, max_to_keep=2)
    do(tmp_path / "2")
    named = re.escape(named)
    with pytest.raises(eqtrace.CheckpointDamagedError, match=f"step 2 .*{named}"):
        _restore(tmp_path, step=2)
    with pytest.warns(RuntimeWarning, match=f"restored step 1, skipping later ones.*{named}"):
        assert _restore(tmp_path) == 1
    _save(tmp_path, 3, max_to_keep=2)
    assert _restore(tmp_path) == 3
    assert _names(tmp_path) == (["1", "2", "3"] if structural else ["2", "3"])
    if structural:
        assert _restore(tmp_path, step=1) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_step_damaged(tmp_path, failed_reads):
    _save(tmp_path, 1)
    _truncate(_largest_file(tmp_path / "1" / "arrays"))
    (tmp_path / "2").mkdir()
    with pytest.raises(
        eqtrace.CheckpointDamagedError, match=r"no complete, readable checkpoint.*step 2.*step 1"
    ):
        _restore(tmp_path)


def test_continuing_from_an_older_step(tmp_path):
    """`discard_newer=True`: a step below the latest, saved after deleting the later ones."""
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert _restore(tmp_path, step=1) == 1
    _save(tmp_path, 2, discard_newer=True)
    assert _names(tmp_path) == ["1", "2"] and _restore(tmp_path) == 2
    _save(tmp_path, 3)
    assert _names(tmp_path) == ["1", "2", "3"]


def test_a_tree_without_arrays(tmp_path):
    """Python scalars only (Orbax refuses an empty tree of arrays: this failed, and left a
    temporary folder behind)."""
    algorithm, model = eqtrace.DRTRL(), nn.LIF(2, 3, key=jr.key(0))
    eqtrace.save_checkpoint(tmp_path, 1, {"steps": 7}, algorithm=algorithm, model=model)
    assert eqtrace.latest_checkpoint(tmp_path) == 1
    like = {"steps": 0}
    assert eqtrace.restore_checkpoint(tmp_path, like, algorithm=algorithm, model=model) == (
        {"steps": 7},
        1,
    )
