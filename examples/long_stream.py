"""A learner that never stops: a million steps of truly online learning, checkpointed as it
goes and resumable from the command line, in constant memory.

One endless stream (the Mackey-Glass series, generated step by step inside the learner, so
the generator's state is part of what is saved), one GRU state carried from the first step to
the last, one Adam update after every step. The learner runs in jitted chunks (`lax.scan` over
`--chunk` steps per call); every `--every` steps its whole condition — parameters, optimiser
state, network state, eligibility trace, stream state and step count — is saved with
`eqtrace.save_checkpoint` (atomically: killing the script while it saves leaves the previous
checkpoint intact). `--resume` continues from the latest checkpoint, exactly as if the run had
not stopped: the digest of the final parameters that the script prints is the same.

    python examples/long_stream.py                        # 10^6 steps, D-RTRL
    python examples/long_stream.py --steps 2000000 --resume   # continue to 2 * 10^6
    python examples/long_stream.py --fast                 # smoke run, seconds

The peak resident memory (RSS) is printed at 10^4, 10^5 and 10^6 steps: it stays flat,
because nothing grows with the length of the stream. Expected result (defaults, 2 CPU cores):
see docs/examples.md.
"""

import argparse
import hashlib
import resource
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import eqtrace


#: Mackey-Glass with a delay of 17 steps (the discrete map), standardised with the series'
#: long-run mean and standard deviation.
DELAY, MEAN, STD = 17, 0.925, 0.235
MILESTONES = (10_000, 100_000, 1_000_000)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="total steps (10^6)")
    parser.add_argument("--chunk", type=int, default=10_000, help="steps per jitted call")
    parser.add_argument("--every", type=int, default=100_000, help="steps between checkpoints")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("outputs/long_stream"),
        help="checkpoint directory (default: outputs/long_stream)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest one")
    parser.add_argument("--algorithm", default="drtrl", choices=["drtrl", "ppprop"])
    parser.add_argument("--hidden", type=int, default=32, help="GRU units (default: 32)")
    parser.add_argument("--horizon", type=int, default=10, help="steps ahead to predict (10)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    parser.add_argument("--fast", action="store_true", help="a small, quick configuration")
    args = parser.parse_args(argv)
    if args.fast:
        args.hidden, args.chunk, args.every = 8, 200, 600
        if "--steps" not in (argv if argv is not None else sys.argv):
            args.steps = 1_200
    if args.every % args.chunk or args.steps % args.chunk:
        parser.error("--every and --steps must be multiples of --chunk")
    return args


def init_stream(seed: int, horizon: int):
    """The generator's state: the last `max(DELAY, horizon) + 1` values of the series, after a
    transient of 1 000 steps from a slightly perturbed constant history."""
    length = max(DELAY, horizon) + 1
    history = 1.2 + 0.05 * jr.uniform(jr.key(seed), (length,))
    history, _ = jax.lax.scan(lambda h, _: (advance_stream(h), None), history, None, 1000)
    return history


def advance_stream(history):
    """One step of `x_{t+1} = x_t + 0.2 x_{t-17} / (1 + x_{t-17}^10) - 0.1 x_t`."""
    delayed, last = history[-1 - DELAY], history[-1]
    new = last + 0.2 * delayed / (1 + delayed**10) - 0.1 * last
    return jnp.concatenate([history[1:], new[None]])


def make_learner(args):
    """The model, the algorithm, the chunk function and a fresh learner tree."""
    gkey, rkey = jr.split(jr.key(args.seed))
    model = eqtrace.nn.Sequential(
        [eqtrace.nn.GRUCell(1, args.hidden, key=gkey), eqx.nn.Linear(args.hidden, 1, key=rkey)]
    )
    algorithm = eqtrace.DRTRL() if args.algorithm == "drtrl" else eqtrace.PPProp(rank=20)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    online_step = eqtrace.make_online_step(algorithm, static)  # one sample: no vmap
    optimizer = optax.adam(args.lr)
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    tree = {
        "params": params,
        "opt_state": optimizer.init(params),
        "state": state,
        "trace": trace,
        "stream": init_stream(args.seed, args.horizon),
        "steps": 0,  # a Python int: exact however long the stream
    }

    def loss_fn(y, target):
        return jnp.mean((y - target) ** 2)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)  # The step count stays outside: no retracing.
    def chunk(tree):
        """`args.chunk` steps: the stream's next inputs and targets, then one update each."""

        def emit(history, _):
            history = advance_stream(history)
            x = history[-1 - args.horizon]  # x(t), and the target x(t + horizon)
            return history, ((x - MEAN) / STD, (history[-1] - MEAN) / STD)

        stream, (xs, targets) = jax.lax.scan(emit, tree["stream"], None, args.chunk)
        params, opt_state, state, trace, losses = eqtrace.train_online(
            online_step,
            loss_fn,
            optimizer,
            tree["params"],
            tree["opt_state"],
            tree["state"],
            tree["trace"],
            xs[:, None],
            targets[:, None],
        )
        new = dict(params=params, opt_state=opt_state, state=state, trace=trace, stream=stream)
        return new, jnp.mean(losses)

    return model, algorithm, chunk, tree


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def digest(params) -> str:
    """A short hash of the parameters' bytes: equal digests, bit-identical parameters."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm

    model, algorithm, chunk, tree = make_learner(args)
    directory = args.checkpoints.resolve()
    latest = eqtrace.latest_checkpoint(directory)
    if latest is not None and not args.resume:
        sys.exit(
            f"{directory} already holds checkpoints (the latest at step {latest}): pass "
            "--resume to continue that run, or --checkpoints with a new directory."
        )
    if args.resume and latest is not None:
        tree, latest = eqtrace.restore_checkpoint(directory, tree, algorithm=algorithm, model=model)
        print(f"resumed from step {latest}")
    print(
        f"Mackey-Glass stream, predict {args.horizon} steps ahead; GRU({args.hidden}) trained "
        f"online with {type(algorithm).__name__}, one Adam update per step, "
        f"steps {tree['steps']} to {args.steps}, a checkpoint every {args.every} in {directory}."
    )
    start, begin = time.perf_counter(), tree["steps"]
    rmse = float("nan")
    with tqdm(total=args.steps, initial=begin, desc="stream", unit="step", ncols=90) as bar:
        while tree["steps"] < args.steps:
            steps = tree["steps"]
            new, loss = chunk({k: v for k, v in tree.items() if k != "steps"})
            tree = {**new, "steps": steps + args.chunk}
            rmse = float(np.sqrt(loss))
            bar.update(args.chunk)
            bar.set_postfix(rmse=f"{rmse:.3f}")
            if tree["steps"] % args.every == 0 or tree["steps"] >= args.steps:
                eqtrace.save_checkpoint(
                    directory, tree["steps"], tree, algorithm=algorithm, model=model, max_to_keep=2
                )
            for milestone in MILESTONES:  # after the checkpoint of that step, if there is one
                if steps < milestone <= tree["steps"]:
                    bar.write(f"peak RSS at step {milestone:>9,}: {peak_rss_mib():.0f} MiB")
    seconds = time.perf_counter() - start
    done = tree["steps"] - begin
    print(
        f"{done} steps in {seconds:.1f} s ({1e6 * seconds / max(done, 1):.1f} µs per step, "
        f"update and checkpoints included); NRMSE over the last chunk {rmse:.3f}; "
        f"peak RSS {peak_rss_mib():.0f} MiB."
    )
    print(f"digest of the parameters at step {tree['steps']}: {digest(tree['params'])}")


if __name__ == "__main__":
    main()
