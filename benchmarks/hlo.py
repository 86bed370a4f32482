"""Where the time of one online step goes: the optimised HLO of one jitted, batched step.

    python -m benchmarks.hlo --model gru --algorithm drtrl            # step + its gradient
    python -m benchmarks.hlo --model gru --algorithm drtrl --no-grad  # state/trace update only
    python -m benchmarks.hlo ... --out /tmp/drtrl_step.hlo            # also save the HLO text
    python -m benchmarks.hlo --model lif --algorithm eprop-block --block 100  # one block

Prints the number of fusions (by kind) and of other materialising ops, the largest buffers
that are materialised (outputs of top-level instructions, i.e. not fused away) next to the
size of the trace, every dot with its batch/contracting dimensions, and XLA's memory analysis
(temporaries, arguments, outputs). The step (or, for a `*-block` algorithm, the block of
`--block` steps with its summed loss) is the body of `eqtrace.online_gradient` for the
configuration of `benchmarks.run`.
"""

import argparse
import collections
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import eqtrace

from . import algorithms
from .problems import DEFAULTS, Config, build_problem


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# name = shape opcode(operands), attributes
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\([^=]*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?)"
    r"\s+(?P<op>[\w\-]+)\((?P<args>.*)$"
)
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
# Ops that do not materialise a new buffer.
_VIEWS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy-start",
          "copy-done", "opt-barrier"}  # fmt: skip


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def parse_hlo(text: str) -> dict[str, list[dict]]:
    """Computations of an HLO module: name -> list of instructions (name, shape, op, rest);
    the entry computation is stored under its name and under `"__entry__"`."""
    computations: dict[str, list[dict]] = {}
    current = None
    for line in text.splitlines():
        # Tuple shapes of 6+ elements carry `/*index=5*/` comments, whose "=" breaks the match.
        line = _COMMENT.sub("", line)
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "=" not in line.split("{")[0].split("(")[0]:
                current = []
                computations[match["name"]] = current
                if match["entry"]:
                    computations["__entry__"] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.append({**match.groupdict(), "line": line.strip()})
    return computations


def _called(instruction: dict) -> list[str]:
    return re.findall(
        r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?",
        instruction["args"],
    )


def analyse(text: str, trace_bytes: int, top: int = 15) -> str:
    """A report on the optimised HLO `text`."""
    computations = parse_hlo(text)
    fused: set[str] = set()
    for instructions in computations.values():
        for ins in instructions:
            if ins["op"] == "fusion":
                for names in _called(ins):
                    fused.update(n.strip().lstrip("%") for n in names.split(","))
    top_level = {k: v for k, v in computations.items() if k not in fused and k != "__entry__"}
    ops: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    buffers = []
    for comp, instructions in top_level.items():
        for ins in instructions:
            ops[ins["op"]] += 1
            if ins["op"] == "fusion":
                kind = re.search(r"kind=(\w+)", ins["args"])
                kinds[kind[1] if kind else "?"] += 1
            if ins["op"] not in _VIEWS:
                buffers.append((_bytes(ins["shape"]), comp, ins))
    lines = [
        f"computations: {len(computations) - 1} ({len(fused)} fused, "
        f"{len(top_level)} top-level: entry, loop bodies/conditions, reducers)",
        "top-level ops: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()),
        "fusion kinds: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()),
        f"trace size: {trace_bytes / 2**20:.2f} MB",
        "",
        "largest materialised buffers (top-level instruction outputs; ≥ trace marked *):",
    ]
    for size, comp, ins in sorted(buffers, key=lambda b: -b[0])[:top]:
        mark = "*" if size >= trace_bytes else " "
        root = ""
        if ins["op"] == "fusion":
            names = _called(ins)
            if names:
                body = computations.get(names[0].split(",")[0].strip().lstrip("%"), [])
                root_ops = [i["op"] for i in body if i["line"].startswith("ROOT")]
                inner = collections.Counter(i["op"] for i in body if i["op"] not in _VIEWS)
                root = f" root={root_ops[0] if root_ops else '?'} inner={dict(inner)}"
        shape = ins["shape"].split("{")[0] if not ins["shape"].startswith("(") else ins["shape"]
        lines.append(
            f" {mark}{size / 2**20:9.2f} MB  {ins['op']:<10} {ins['name']:<28} {shape[:70]}"
            f"  [{comp}]{root}"
        )
    lines += ["", *traffic(computations, top_level, trace_bytes)]
    lines += ["", "dots (anywhere, fused or not):"]
    for comp, instructions in computations.items():
        if comp == "__entry__":
            continue
        for ins in instructions:
            if ins["op"] in ("dot", "convolution"):
                dims = re.findall(r"(\w+_dims=\{[\d,]*\})", ins["args"])
                operands = re.findall(r"(\w+\[[\d,]*\])", ins["args"].split(")")[0])
                lines.append(
                    f"  {ins['name']:<22} {ins['shape'].split('{')[0]:<22} <- "
                    f"{' x '.join(operands)}  {' '.join(dims)}  "
                    f"[{'fused' if comp in fused else 'top'}: {comp}]"
                )
    return "\n".join(lines)


def traffic(computations: dict, top_level: dict, trace_bytes: int) -> list[str]:
    """The passes over trace-sized buffers: bytes that top-level instructions read (operands)
    and write (outputs) in buffers of at least 1/16 of the trace (its leaves; the trace-sized
    temporaries), in units of the whole trace. A step that reads its trace once and writes it
    once makes 2.0; loop bodies count once (per iteration)."""
    threshold = trace_bytes / 16
    read = written = 0
    for instructions in top_level.values():
        sizes = {ins["name"]: _bytes(ins["shape"]) for ins in instructions}
        for ins in instructions:
            if ins["op"] in _VIEWS or ins["op"] == "while":
                continue
            out = _bytes(ins["shape"])
            if out >= threshold:
                written += out
            operands = ins["args"].split(")")[0]
            for name in re.findall(r"%([\w.\-]+)", operands):
                size = sizes.get(name, 0)
                if size >= threshold:
                    read += size
    return [
        f"trace-sized traffic (buffers ≥ 1/16 of the trace; loop bodies once): read "
        f"{read / 2**20:.2f} MB, written {written / 2**20:.2f} MB = "
        f"{read / trace_bytes:.2f} + {written / trace_bytes:.2f} = "
        f"{(read + written) / trace_bytes:.2f} passes over the trace"
    ]


def memory_report(compiled) -> str:
    """XLA's static buffer sizes of a compiled call (`compiled.memory_analysis()`)."""
    try:
        stats = compiled.memory_analysis()
    except Exception as error:  # not every backend reports it
        return f"memory analysis: unavailable ({type(error).__name__})"
    fields = ("temp", "argument", "output", "alias", "generated_code")
    sizes = [(f, getattr(stats, f"{f}_size_in_bytes", None)) for f in fields]
    return "memory analysis (MB): " + ", ".join(
        f"{f} {size / 2**20:.2f}" for f, size in sizes if size is not None
    )


def online_step_functions(config: Config, name: str):
    """`(step, step_with_grad, args, trace_bytes)` for one batched online step, or for a
    `*-block` algorithm one batched block of `config.block` steps (its loss summed)."""
    problem = build_problem(config)
    entry = algorithms.get(name)
    algorithm = entry.make_rule(config)
    state, trace = eqtrace.init_state_and_trace(problem.model, algorithm, config.batch)
    t = jnp.asarray(3)
    if entry.block:
        online_block = jax.vmap(
            eqtrace.make_online_block(algorithm, problem.static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
        offsets = jnp.arange(config.block)

        def step(params, stream, state, trace, t):
            return online_block(params, state, trace, jax.vmap(stream.x)(t + offsets))

        def objective(stream, y, t):  # the block's loss, summed over its steps
            return jnp.sum(jax.vmap(stream.loss)(y, t + offsets))

    else:
        online_step = jax.vmap(
            eqtrace.make_online_step(algorithm, problem.static), in_axes=(None, 0, 0, 0)
        )

        def step(params, stream, state, trace, t):
            return online_step(params, state, trace, stream.x(t))

        def objective(stream, y, t):
            return stream.loss(y, t)

    def step_with_grad(params, stream, state, trace, t):
        def loss(params):
            new_state, new_trace, y = step(params, stream, state, trace, t)
            return objective(stream, y, t), (new_state, new_trace)

        return jax.value_and_grad(loss, has_aux=True)(params)

    trace_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trace))
    args = (problem.params, problem.stream, state, trace, t)
    return step, step_with_grad, args, trace_bytes


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hlo", description=__doc__)
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="gru")
    online = [a.name for a in algorithms.REGISTRY.values() if a.online]
    parser.add_argument("--algorithm", default="drtrl", choices=online)
    parser.add_argument("--input", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rank", type=float, default=4.0)
    parser.add_argument("--block", type=int, default=50, help="steps per block for *-block")
    parser.add_argument("--no-grad", action="store_true", help="the update only, no gradient")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", help="write the optimised HLO text here")
    parser.add_argument("--time", type=int, default=0, help="also time N calls (min and median)")
    args = parser.parse_args(argv)
    n_in, hidden, batch, _ = DEFAULTS[args.model]
    config = Config(
        model=args.model,
        input=args.input or n_in,
        hidden=args.hidden or hidden,
        batch=args.batch or batch,
        steps=1,
        rank=args.rank,
        block=args.block,
    )
    step, step_with_grad, call_args, trace_bytes = online_step_functions(config, args.algorithm)
    f = step if args.no_grad else step_with_grad
    start = time.perf_counter()
    lowered = jax.jit(f).lower(*call_args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    text = compiled.as_text()
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    report = analyse(text, trace_bytes, args.top) + "\n\n" + memory_report(compiled)
    what = "block" if algorithms.get(args.algorithm).block else "step"
    print(f"# {args.algorithm} {'update' if args.no_grad else what + ' + gradient'}: {config}")
    print(f"trace + lower {traced - start:.2f} s, XLA compile {done - traced:.2f} s")
    if args.time:
        times = []
        for _ in range(args.time + 1):  # the first call is a warm-up
            start = time.perf_counter()
            jax.block_until_ready(compiled(*call_args))
            times.append(time.perf_counter() - start)
        times = sorted(times[1:])
        report += (
            f"\ntime per call over {args.time} calls: min {times[0] * 1e3:.2f} ms, "
            f"median {times[len(times) // 2] * 1e3:.2f} ms"
        )
    print(report)
    return report


if __name__ == "__main__":
    main()
