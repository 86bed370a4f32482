"""Every script in `examples/` runs end to end in its fast configuration.

Each example runs as a subprocess (`python examples/X.py --fast`), as a user would run it, in
its own JAX process (float32, not this suite's float64).
`long_stream.py` has a test of its own: run straight on, and resumed from its checkpoint
half way.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from doc_blocks import ROOT, blocks


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 300  # seconds; a fast run takes 10-30 s

# script -> (extra arguments, text its output must contain, plot it saves)
CASES = {
    "demo": ([], ["D-RTRL", "pp-prop", "BPTT", "memory/sample"], None),
    # demo.py already runs the three methods through the same helpers: one is enough here,
    # with the delay-line front-end that demo.py does not use.
    "mnist1d_gru": (
        ["--algorithms", "drtrl", "--delay", "4"],
        ["DelayLine(4) + GRU", "D-RTRL", "ms per update"],
        "mnist1d_gru.png",
    ),
    "spiking_working_memory": ([], ["D-RTRL", "pp-prop", "BPTT"], "spiking_working_memory.png"),
    "online_mackey_glass": ([], ["NRMSE", "persistence"], "online_mackey_glass.png"),
    "custom_cell": ([], ["structure: OK", "relative error", "test accuracy"], "custom_cell.png"),
    "batching_and_sequences": ([], ["max difference", "update"], "batching_and_sequences.png"),
    "sharded_training": (["--devices", "4"], ["trace/device", "train_online on mesh"], None),
    "nir_export": ([], ["test accuracy", "hidden spikes identical: True", "max output"], None),
    "reward_modulated": ([], ["D-RTRL + TD", "BPTT", "memory/sample"], "reward_modulated.png"),
}
#: Examples that need an optional extra: skipped (not failed) without it.
NEEDS = {"reward_modulated": "gymnax"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# script -> the header lines of the outputs docs/examples.md records from its full runs (marked
# `<!-- recorded: ... examples/X.py ... -->`; their numbers are measurements).
RECORDED: dict[str, list[str]] = {}
for _block in blocks(ROOT / "docs" / "examples.md"):
    _script = re.search(r"examples/(\w+)\.py", _block.reason)
    if _block.marker == "recorded" and _script:
        RECORDED.setdefault(_script[1], []).append(_block.body.splitlines()[0])


def _command(name: str, out: Path) -> list[str]:
    args, _, plot = CASES[name]
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), "--fast", *args]
    if plot is not None:
        command += ["--out", str(out)]
    return command


def _environment(**extra: str) -> dict[str, str]:
    """A user's environment: float32, and no persistent compilation cache (the suite's cache
    pays across its workers; an example's programs are its own, so writing them is waste)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", **extra)
    env.pop("JAX_ENABLE_X64", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return env


def _run(name: str, out: Path) -> subprocess.CompletedProcess:
    env = _environment(MPLBACKEND="Agg")
    try:
        result = subprocess.run(
            _command(name, out), cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"examples/{name}.py --fast did not finish in {TIMEOUT} s:\n{error.stdout}")
    return result


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    # One example per test, run to its end here: pytest-xdist spreads the tests over the
    # workers, so the examples still run side by side with the rest of the suite. (Starting
    # every example from a module fixture ran each one once per worker, and left the pipes of
    # the ones a worker never waited for open.)
    result = _run(name, tmp_path)
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, f"examples/{name}.py --fast failed:\n{stdout}\n{stderr}"
    _, expected, plot = CASES[name]
    for text in expected:
        assert text in stdout, f"{text!r} missing from the output of {name}.py:\n{stdout}"
    # The tables docs/examples.md records from full runs have the columns the script prints.
    printed = stdout.splitlines()
    for header in RECORDED.get(name, []):
        assert header in printed, (
            f"docs/examples.md shows a header {name}.py no longer prints:\n{header}\n{stdout}"
        )
    if plot is not None:
        if HAS_MATPLOTLIB:
            assert (tmp_path / plot).is_file(), f"{name}.py did not save {plot}:\n{stdout}"
        else:
            assert "matplotlib is not installed" in stdout


def test_long_stream_resumes_from_the_command_line(tmp_path):
    """examples/long_stream.py run straight to `--steps 1000` (its fast default is 1 200)
    stops there and saves a checkpoint at 600 on the way (every 600) and at its last step;
    resumed with `--resume` from a copy of the 600 checkpoint alone (as if the run had been
    stopped right after saving it), a new process ends as the straight run does, bit for bit
    (the script prints a digest of its final parameters). (One run fewer than stopping a second
    run at 600: the resumed process's start is the straight run's own state at 600.)"""
    env = _environment()

    def run(directory, *extra):
        command = [
            sys.executable,
            str(EXAMPLES / "long_stream.py"),
            "--fast",
            "--steps",
            "1000",
            "--checkpoints",
            str(tmp_path / directory),
            *extra,
        ]
        result = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, result.stdout
        return result.stdout

    straight = run("straight")
    assert "peak RSS" in straight
    # Orbax's step folders (`<step>`): the checkpoint at 600 and the one at the last step.
    steps = sorted(p.name for p in (tmp_path / "straight").iterdir() if p.name.isdigit())
    assert steps == ["1000", "600"]
    assert "digest of the parameters at step 1000" in straight
    shutil.copytree(tmp_path / "straight" / "600", tmp_path / "interrupted" / "600")
    resumed = run("interrupted", "--resume")
    assert "resumed from step 600" in resumed

    def digest(output):
        return [line for line in output.splitlines() if line.startswith("digest")]

    assert digest(resumed) == digest(straight) != []
