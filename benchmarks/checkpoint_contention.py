"""Counts the saves that fail while another process uses the checkpoint directory.

`reader`: a process polls `latest_checkpoint` every 50 ms (an evaluator) while another saves
15 times. `writers`: two processes save 15 times each into one directory at once.

Command (from the repository root; any eqtrace on the path, e.g. another checkout's `src`):

    JAX_PLATFORMS=cpu PYTHONPATH=src python benchmarks/checkpoint_contention.py reader
    JAX_PLATFORMS=cpu PYTHONPATH=src python benchmarks/checkpoint_contention.py writers

Prints the failed saves (and polls) and the distinct errors; Orbax's own log goes to stderr.
"""

import multiprocessing
import sys
import tempfile
import time


SAVES = 15


def _writer(directory: str, first: int, results) -> None:
    import jax
    import jax.numpy as jnp

    import eqtrace

    algorithm = eqtrace.DRTRL()
    model = eqtrace.nn.LIF(2, 3, dtype=jnp.float32, key=jax.random.key(0))
    errors = []
    for i in range(SAVES):
        step = first + 2 * i  # two writers: interleaved steps, as two runs would not collide
        try:
            tree = {"x": jnp.full((200_000,), float(step))}
            eqtrace.save_checkpoint(directory, step, tree, algorithm=algorithm, model=model)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {str(error)[:90]}")
    results.put(errors)


def _reader(directory: str, stop, results) -> None:
    import eqtrace

    polls, failed = 0, 0
    while not stop.is_set():
        polls += 1
        try:
            eqtrace.latest_checkpoint(directory)
        except Exception:
            failed += 1
        time.sleep(0.05)
    results.put((polls, failed))


def main(mode: str) -> None:
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp(prefix="eqtrace-contention-")
    results = context.Queue()
    if mode == "reader":
        stop, polled = context.Event(), context.Queue()
        reader = context.Process(target=_reader, args=(directory, stop, polled))
        reader.start()
        time.sleep(3)  # the reader has imported eqtrace and is polling
        writer = context.Process(target=_writer, args=(directory, 0, results))
        writer.start()
        errors = results.get()
        writer.join()
        stop.set()
        polls, failed = polled.get()
        reader.join()
        print(
            f"reader polling: {len(errors)} of {SAVES} saves failed "
            f"({failed} of {polls} polls failed)"
        )
    elif mode == "writers":
        writers = [context.Process(target=_writer, args=(directory, k, results)) for k in (0, 1)]
        for writer in writers:
            writer.start()
        each = [results.get() for _ in writers]
        for writer in writers:
            writer.join()
        errors = [error for found in each for error in found]
        print(
            f"two writers: {len(errors)} of {2 * SAVES} saves failed; "
            f"per writer {sorted(len(found) for found in each)}"
        )
    else:
        raise SystemExit(f"usage: {sys.argv[0]} reader|writers")
    for error in sorted(set(errors)):
        print("  ", error)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
