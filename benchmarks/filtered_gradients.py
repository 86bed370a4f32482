"""The online gradient against BPTT's at initialisation on the harness's spiking tasks, per rule:
the cosine and the norm ratio, overall and for the spiking layer alone (the read-out's own
gradient is exact under every rule), on the held-out batch of `benchmarks.tasks`.

    python -m benchmarks.filtered_gradients --out benchmarks/results/filtered_gradients.json

What `eqtrace.Filtered` changes is the credit through the read-out's leak, which the per-layer
rules (`drtrl`, `snap1`) drop: this measures it without training, in seconds per rule.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

import eqtrace

from .tasks import DEFAULTS, environment, make_algorithm, make_gradient, make_task, parse_rule


def _norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(tree))))


def _cosine(a, b) -> float:
    dot = sum(jnp.sum(x * y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))
    return float(dot / (_norm(a) * _norm(b)))


def measure(task_name: str, seed: int, rules: list[str]) -> list[dict]:
    config = dict(DEFAULTS[task_name])
    task = make_task(task_name, config, seed)
    model = task.make_model(jr.key(seed))
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = task.held_out_batch()
    batch = int(xs.shape[1])
    _, reference = eqx.filter_jit(make_gradient(task, "bptt", None, model, batch))(
        params, xs, targets
    )
    rows = []
    for spec in rules:
        rule, decay, label = parse_rule(spec, config)
        algorithm = make_algorithm(rule, decay)
        gradient = eqx.filter_jit(make_gradient(task, rule, algorithm, model, batch))
        _, grads = gradient(params, xs, targets)
        overall = eqtrace.compare_gradients(grads, reference)
        spiking, spiking_ref = grads.layers[0], reference.layers[0]
        rows.append(
            {
                "task": task_name,
                "seed": seed,
                "rule": spec,
                "label": label,
                "cosine": float(overall.overall_cosine),
                "norm_ratio": float(overall.overall_norm_ratio),
                "spiking_layer_cosine": _cosine(spiking, spiking_ref),
                "spiking_layer_norm_ratio": _norm(spiking) / _norm(spiking_ref),
                "memory_floats": int(eqtrace.trace_size(algorithm, model).values),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="dms,evidence")
    parser.add_argument("--rules", default="drtrl,snap1,eprop,snap1-filtered")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = []
    for task_name in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += measure(task_name, seed, args.rules.split(","))
    record = {
        "command": "python -m benchmarks.filtered_gradients "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        **environment(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
