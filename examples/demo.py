"""eqtrace demo: train a GRU online with D-RTRL on MNIST-1D, and compare with pp-prop and BPTT.

MNIST-1D (generated locally, no download): 4 000 training and 1 000 test sequences of 40
scalars, 10 classes. A GRU reads one scalar per time step; a linear read-out classifies the
sequence at the last step (cross-entropy). Each update takes a batch of 100 sequences:

- D-RTRL and pp-prop run the online step (`eqtrace.make_online_step`, `jax.vmap`ped over the
  batch) forward over the sequence, carrying an eligibility trace whose size does not depend on
  the sequence length, and read the gradient off the trace at the last step;
- BPTT is `jax.grad` through the unrolled sequence, the reference.

The printed table gives the test accuracy, the wall time of training (compilation included) and
the memory each method keeps per sample to compute its gradient (the trace pytree's size).

    python examples/demo.py                      # all three: 2.5 min on 2 idle CPU cores, 4.5 busy
    python examples/demo.py --algorithms drtrl,bptt --hidden 64 --steps 500

Expected with the defaults (GRU of 128 units, 1 500 updates of batch 100, seed 0; measured
2026-12-07 on an idle 2-core machine: 141 s in all; 273 s when the test suite ran beside it):

    method   test acc train acc  compile    total ms/update            memory/sample
    --------------------------------------------------------------------------------
    D-RTRL      90.4%     99.9%     1.9s    77.7s      50.6    50,304 fl / 196.5 KiB
    pp-prop     51.9%     59.0%     1.4s    19.1s      11.8         898 fl / 3.5 KiB
    BPTT        98.3%    100.0%     1.3s    36.4s      23.5     5,120 fl / 20.0 KiB*

(below the table, what each method is for: online with memory constant in `T`; online with the
least memory, weak on this task, see the docs' "How to choose"; the offline reference, whose
memory grows with `T`).

Chance is 10 %. D-RTRL drops the credit paths through other neurons' recurrent weights, so it
stays below BPTT; pp-prop further factorises each weight trace into an input and an output
trace (about 50 times less memory than D-RTRL here). The data helpers, the model and the update
step, shared with `mnist1d_gru.py` (the longer run), are in `examples/_mnist1d.py`.
"""

import argparse
import time

from _mnist1d import METHODS, load_mnist1d, results_table, train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--algorithms",
        default=",".join(METHODS),
        help="comma-separated subset of drtrl, ppprop, bptt (default: all three)",
    )
    parser.add_argument("--hidden", type=int, default=128, help="GRU units (default: 128)")
    parser.add_argument("--steps", type=int, default=1500, help="updates (default: 1500)")
    parser.add_argument("--batch", type=int, default=100, help="sequences per update (100)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate (1e-2)")
    parser.add_argument("--rank", type=float, default=100.0, help="pp-prop rank (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="a tiny smoke run (hidden 8, 20 updates of batch 16, 500 sequences in all)",
    )
    args = parser.parse_args(argv)
    if args.fast:
        args.hidden, args.steps, args.batch = 8, 20, 16
    args.num_samples = 500 if args.fast else 5000
    args.algorithms = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(args.algorithms) - set(METHODS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_mnist1d(num_samples=args.num_samples)
    length = data["x_train"].shape[1]
    print(
        f"MNIST-1D: {len(data['y_train'])} train / {len(data['y_test'])} test sequences of "
        f"length {length}.\nGRU({args.hidden}) + linear read-out, {args.steps} updates of batch "
        f"{args.batch}, Adam (peak lr {args.lr:g}, cosine decay)."
    )
    results = []
    for method in args.algorithms:
        results.append(
            train(
                method,
                data,
                hidden=args.hidden,
                steps=args.steps,
                batch_size=args.batch,
                learning_rate=args.lr,
                seed=args.seed,
                rank=args.rank,
            )
        )
    print()
    print(results_table(results, length))
    print(
        f"\nChance is 10 %. pp-prop used rank {args.rank:g}. "
        f"Total time {time.perf_counter() - start:.0f} s."
    )
    return results


if __name__ == "__main__":
    main()
