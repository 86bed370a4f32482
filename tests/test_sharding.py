"""Data- and model-parallel online learning on four host CPU devices, against one device.

The sharded runs happen in subprocesses (`sharding_checks.py`), where the device count is set
before JAX starts; each case there compares a driver on a mesh with the same driver on one
device in float64 and reports the layout of the trace it returns. Here: the errors, that the
trace is created in its layout and comes back no larger per device (never gathered), and that
no collective of the compiled program other than the gradient's all-reduce moves an array as
large as a shard of a D-RTRL weight trace. With `EQTRACE_MULTIPROCESS=1`, two processes of two
devices each also form one mesh through `jax.distributed` on localhost. The layout helpers'
own checks (specs of an embedding) run in this process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import eqtrace
from helpers import TokenCell


SCRIPT = Path(__file__).resolve().parent / "sharding_checks.py"
TIMEOUT = 900  # seconds; about 30 s of CPU in all, but the machine may be shared
CASES = [
    "data/online_gradient/explicit",
    "data/train_online/block",
    "model/drtrl/gru",
    "model/ppprop/lif/train_online/block",
    "model/eprop/lif/online_gradient",
    "model/windows/gru/train_online/block",
]
#: Two processes of two devices each, one mesh through `jax.distributed` on localhost.
MULTIPROCESS_CASES = ["model/drtrl/gru"]


def _environment(devices: int) -> dict[str, str]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(
            flag
            for flag in (
                os.environ.get("XLA_FLAGS"),
                f"--xla_force_host_platform_device_count={devices}",
            )
            if flag
        ),
    )
    env.pop("JAX_ENABLE_X64", None)
    return env


def _results(stdout: str) -> dict[str, dict]:
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {result["name"]: result for result in results}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


#: The two-process run is opt-in: it costs two more JAX processes (about 30 s of CPU each,
#: most of it in `jax.distributed`'s start and in compilation) and a free local port.
MULTIPROCESS = os.environ.get("EQTRACE_MULTIPROCESS") == "1"


@pytest.fixture(scope="module")
def runs():
    """Starts the single-process run (and the two-process run) at once."""
    commands = {"single": ([*CASES], 4)}
    if MULTIPROCESS:
        port = str(_free_port())
        for i in range(2):
            options = ["--processes", "2", "--process-id", str(i), "--port", port]
            commands[f"process {i}"] = ([*MULTIPROCESS_CASES, *options], 2)
    processes = {
        key: subprocess.Popen(
            [sys.executable, str(SCRIPT), *arguments],
            env=_environment(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, (arguments, devices) in commands.items()
    }
    outputs = {}
    try:
        for key, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            if process.returncode:
                pytest.fail(f"{SCRIPT.name} ({key}) failed:\n{stdout}\n{stderr}")
            outputs[key] = _results(stdout)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


def _check(result: dict) -> None:
    assert result["error"] < 1e-12, result
    laid_out, initial, returned = result["laid_out"], result["initial"], result["returned"]
    # Created directly in their layout, and returned at most as large per device (never
    # gathered; XLA may split another axis of an array than the one laid out).
    assert initial == laid_out
    for got, asked in zip(returned, laid_out):
        assert np.prod(got) <= np.prod(asked), (result["name"], returned, laid_out)
    assert all(count == 4 for count in result["devices"])
    if result["smallest_weight_trace_shard"] is not None:
        assert result["largest_gather"] < result["smallest_weight_trace_shard"], result


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_single_device(case, runs):
    result = runs["single"][case]
    _check(result)
    batch = 8
    if case.startswith("data"):  # Every trace array split along the batch only.
        assert all(shape[0] == batch // 4 for shape in result["laid_out"])
        assert result["largest_gather"] == 0
    else:  # On a (2, 2) mesh: the batch in two, and the large traces along neurons too.
        assert all(shape[0] == batch // 2 for shape in result["laid_out"])
        assert any(s[1:] != full[1:] for s, full in zip(result["laid_out"], result["full"]))


@pytest.mark.skipif(not MULTIPROCESS, reason="set EQTRACE_MULTIPROCESS=1 to run")
@pytest.mark.parametrize("case", MULTIPROCESS_CASES)
def test_two_processes(case, runs):
    for process in ("process 0", "process 1"):
        _check(runs[process][case])


def _model():
    key = jr.key(0)
    return eqtrace.nn.Sequential(
        [eqtrace.nn.GRUCell(3, 4, key=key), eqx.nn.Linear(4, 2, key=jr.fold_in(key, 1))]
    )


def test_model_parallel_specs():
    """The weights and D-RTRL traces of each op split along its output axis; the read-out
    (no trace), the state and the op inputs replicated over the model axis."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))
    model = _model()
    shardings = eqtrace.make_shardings(model, eqtrace.DRTRL(), mesh, model_axis="model")
    cell, readout = shardings.params.layers
    assert cell.input_op.weight.spec == P("model", None)
    assert cell.recurrent_op.bias.spec == P("model")
    assert readout.weight.spec == P(None, None)
    trace = shardings.trace[0].ops[0]
    assert trace.weight.spec == P("batch", "model", None, None)
    assert shardings.state[0].spec == P("batch")
    assert shardings.trace[1] is None
    ppprop = eqtrace.make_shardings(model, eqtrace.PPProp(0.5), mesh, model_axis="model")
    assert ppprop.trace[0].outputs[0].spec == P("batch", None, "model")
    assert ppprop.trace[0].inputs[0].spec == P("batch", None)


def test_output_axis_of_an_embedding():
    """The output axis is found from the op's algebra: an embedding `(vocabulary, out)` splits
    its second axis, also for an op registered by a user."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))
    cell = TokenCell(key=jr.key(0))
    shardings = eqtrace.make_shardings(
        cell, eqtrace.DRTRL(), mesh, model_axis="model", x=jnp.zeros((), int)
    )
    assert shardings.params.embed.weight.spec == P(None, "model")
    assert shardings.trace.ops[0].weight.spec == P("batch", None, "model", None)
    assert shardings.params.recurrent.weight.spec == P("model", None)


def test_sharding_errors():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    model = _model()
    with pytest.raises(ValueError, match="`batch_axis` must name an axis of `mesh`"):
        eqtrace.make_shardings(model, eqtrace.DRTRL(), mesh)
    with pytest.raises(ValueError, match="`model_axis` splits the traces of the diagonal"):
        eqtrace.make_shardings(model, eqtrace.RTRL(), mesh, batch_axis="data", model_axis="data")


def test_model_parallel_specs_through_wrappers():
    """`ExactWindows(DRTRL())` lays out D-RTRL's trace, and `EProp()` its eligibility traces
    and their filtered copies, along neurons: read from the plan, not from the rule's type."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))
    key = jr.key(0)
    model = eqtrace.nn.Sequential(
        [
            eqtrace.nn.LIF(3, 4, recurrent=True, key=key),
            eqtrace.nn.LeakyReadout(4, 2, key=jr.fold_in(key, 1)),
        ]
    )
    drtrl = eqtrace.make_shardings(model, eqtrace.DRTRL(), mesh, model_axis="model")
    windows = eqtrace.make_shardings(
        model, eqtrace.ExactWindows(eqtrace.DRTRL()), mesh, model_axis="model"
    )
    assert windows == drtrl
    plan = eqtrace.prepare(eqtrace.EProp(), model)
    eprop = eqtrace.make_shardings(model, eqtrace.EProp(), mesh, model_axis="model", plan=plan)
    assert eprop.params == drtrl.params
    cell = eprop.trace[0]
    assert cell.eligibility == drtrl.trace[0]
    assert cell.ops[1].weight.spec == P("batch", "model", None)
    assert eprop.trace[1].ops is None  # The read-out's trace is unfiltered.
