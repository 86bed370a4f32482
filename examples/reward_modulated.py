"""Reward-modulated (three-factor) online learning: a recurrent actor-critic on CartPole, its
online gradient modulated by the reward-prediction error, against the same agent trained with
BPTT over rollouts.

The environment is gymnax's CartPole-v1 (JAX-native, so the environments, the network and the
learning rule run inside one `lax.scan`; `pip install "eqtrace[rl]"`). By default the agent sees
the whole state; with `--observe positions` only the cart's position and the pole's angle, so
that it must estimate the velocities from its observations' history, in its recurrent state
(harder: neither agent learned it within the default budget).

The network is `Sequential([GRUCell(4, 32), Linear(32, 3)])`: two policy logits and a value.
Both agents run 32 environments side by side and take the same number of environment steps.

- **Online (three-factor):** one Adam update after *every* step. The rule's eligibility traces
  (D-RTRL by default, `--algorithm`) give the online gradient of the step's output; the
  reward-prediction error `δ_t = r_t + γ V(o_{t+1}) - V(o_t)` is the third factor, in place of a
  loss's cotangent: `eqtrace.modulated_loss(-log π(a_t | y_t) - c V_t, δ_t)`, whose gradient is
  `-δ_t (∇ log π(a_t) + c ∇V_t)` along the traces: a one-step actor-critic whose credit
  through time comes from the traces (reward-based e-prop of Bellec et al. 2020 without their
  per-synapse filter of the traces, λ = 0). `V(o_{t+1})` is read by a forward step from the new
  state (the environment is a pure function, so the next observation is known within the step).
  Memory per environment: the rule's trace, constant in time.
- **BPTT:** the same network and loss, the modulator being the generalised advantage (GAE,
  λ = 0.95) of a rollout of `--rollout` steps, one update per rollout, by backpropagation
  through the whole rollout (memory grows with its length).

Both reset the recurrent state (and the online trace) when an episode ends. The table gives the
mean return of the episodes that ended in each slice of the run (500 is the maximum, random play
about 22). Measured with the defaults (seed 0, 2 CPU cores shared with other jobs, 70 s in all):
the online agent reached 83.6 after 96 000 environment steps and 325.5 after 192 000; BPTT,
with 300 updates to the online agent's 6 000, 30.0 (docs/examples.md has the whole table).

    python examples/reward_modulated.py               # both agents, about 1 min on 2 cores
    python examples/reward_modulated.py --plot        # and the learning curves, to outputs/
    python examples/reward_modulated.py --fast        # smoke run, seconds
"""

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from _plotting import pyplot

import eqtrace


ALGORITHMS = {"drtrl": eqtrace.DRTRL, "snap1": eqtrace.SnAp1, "rtrl": eqtrace.RTRL}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="drtrl", choices=sorted(ALGORITHMS))
    parser.add_argument("--methods", default="online,bptt", help="online,bptt (default: both)")
    parser.add_argument("--observe", default="all", choices=["all", "positions"])
    parser.add_argument("--hidden", type=int, default=32, help="GRU units (default: 32)")
    parser.add_argument("--envs", type=int, default=32, help="parallel environments (32)")
    parser.add_argument("--steps", type=int, default=6000, help="steps per environment (6000)")
    parser.add_argument("--slices", type=int, default=10, help="points of the learning curve")
    parser.add_argument("--rollout", type=int, default=20, help="BPTT rollout length (20)")
    parser.add_argument("--lr-online", type=float, default=1e-3, help="online Adam lr (1e-3)")
    parser.add_argument("--lr-bptt", type=float, default=2e-3, help="BPTT Adam lr (2e-3)")
    parser.add_argument("--gamma", type=float, default=0.99, help="discount (0.99)")
    parser.add_argument("--value-coef", type=float, default=0.5, help="critic weight c (0.5)")
    parser.add_argument("--entropy", type=float, default=0.01, help="entropy bonus (0.01)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    parser.add_argument("--plot", action="store_true", help="save the learning curves")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where to save plots")
    parser.add_argument("--fast", action="store_true", help="a tiny smoke run")
    args = parser.parse_args(argv)
    if args.fast:
        args.envs, args.steps, args.slices, args.hidden, args.rollout = 4, 100, 2, 8, 25
        args.plot = True
    return args


class Env:
    """CartPole-v1 from gymnax, batched, observing positions only or everything."""

    def __init__(self, observe: str):
        import gymnax

        self.env, self.params = gymnax.make("CartPole-v1")
        self.keep = jnp.array([0, 2]) if observe == "positions" else jnp.arange(4)
        self.actions = self.env.action_space(self.params).n

    @property
    def observation_size(self) -> int:
        return int(self.keep.shape[0])

    def reset(self, key, n):
        obs, state = jax.vmap(self.env.reset, in_axes=(0, None))(jr.split(key, n), self.params)
        return obs[:, self.keep], state

    def step(self, key, state, action):
        """The next observation (a new episode's where one ended), the state, the reward,
        whether the pole fell (`terminated`) or the episode ended (fell, or hit 500 steps),
        and the observation the step reached (before any reset)."""
        n = action.shape[0]
        step = jax.vmap(self.env.step, in_axes=(0, 0, 0, None))
        obs, state, reward, terminated, truncated, info = step(
            jr.split(key, n), state, action, self.params
        )
        done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
        reached = info["final_observation"][:, self.keep]
        return obs[:, self.keep], state, reward, terminated.astype(jnp.float32), done, reached


def reset_where(done, fresh, tree):
    """`tree` with the samples whose episode ended replaced by `fresh` (a new episode)."""

    def pick(new, old):
        if not eqx.is_array(old):
            return old
        flag = jnp.reshape(done, done.shape + (1,) * (old.ndim - 1)) > 0
        return jnp.where(flag, new, old)

    return jax.tree.map(pick, fresh, tree)


def heads(y, actions):
    """Policy log-probabilities and value from the read-out's outputs."""
    return jax.nn.log_softmax(y[..., :actions]), y[..., actions]


class Episodes(eqx.Module):
    """Running returns, and for each step the returns of the episodes that ended there."""

    running: jax.Array

    def update(self, reward, done):
        running = self.running + reward
        return Episodes(running * (1 - done)), (running, done)


def online_agent(args, env, model, key):
    """Online actor-critic: one update per step, the TD error modulating the online gradient."""
    algorithm = ALGORITHMS[args.algorithm]()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    fresh = eqtrace.init_state_and_trace(model, algorithm, batch_size=args.envs)
    optimizer = optax.adam(args.lr_online)
    n, actions = args.envs, env.actions

    def body(carry, key):
        params, opt_state, env_state, obs, state, trace, episodes = carry
        k_act, k_env = jr.split(key)

        def loss(params):
            new_state, new_trace, y = step(params, state, trace, obs)
            log_pi, value = heads(y, actions)
            action = jr.categorical(k_act, jax.lax.stop_gradient(log_pi))
            next_obs, next_env, reward, fell, done, reached = env.step(k_env, env_state, action)
            # V(o_{t+1}) from the new state: the bootstrap of the TD error (held constant by
            # `modulated_loss`); none after a fall, the reached state's after a time-out.
            _, y_next = forward(params, new_state, reached)
            next_value = heads(y_next, actions)[1]
            delta = reward + args.gamma * (1 - fell) * next_value - value
            log_pi_a = jnp.take_along_axis(log_pi, action[:, None], axis=1)[:, 0]
            # The third factor: the TD error, in place of the loss's cotangent.
            signal = eqtrace.modulated_loss(-log_pi_a - args.value_coef * value, delta / n)
            entropy = -jnp.mean(jnp.sum(jnp.exp(log_pi) * log_pi, axis=1))
            aux = (new_state, new_trace, next_env, next_obs, reward, done)
            return signal - args.entropy * entropy, aux

        grads, aux = jax.grad(loss, has_aux=True)(params)
        state, trace, env_state, obs, reward, done = aux
        state, trace = reset_where(done, fresh, (state, trace))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        episodes, ended = episodes.update(reward, done)
        return (params, opt_state, env_state, obs, state, trace, episodes), ended

    @eqx.filter_jit
    def run(carry, keys):
        return jax.lax.scan(body, carry, keys)

    k_reset, key = jr.split(key)
    obs, env_state = env.reset(k_reset, n)
    carry = (params, optimizer.init(params), env_state, obs, *fresh, Episodes(jnp.zeros(n)))
    memory = eqtrace.trace_size(algorithm, model).values
    return run, carry, key, args.steps, memory


def bptt_agent(args, env, model, key):
    """The same agent trained with BPTT: one update per rollout, GAE as the modulator."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    fresh = model.init_state()
    fresh = jax.tree.map(lambda a: jnp.broadcast_to(a, (args.envs, *a.shape)), fresh)
    optimizer = optax.adam(args.lr_bptt)
    n, actions, length = args.envs, env.actions, args.rollout

    def unroll(params, state, observations, dones):
        """The network over a rollout (states reset after an episode ends)."""

        def body(state, inputs):
            obs, done = inputs
            state, y = forward(params, state, obs)
            return reset_where(done, fresh, state), y

        return jax.lax.scan(body, state, (observations, dones))

    def collect(params, env_state, obs, state, key):
        def body(carry, key):
            env_state, obs, state = carry
            k_act, k_env = jr.split(key)
            new_state, y = forward(params, state, obs)
            action = jr.categorical(k_act, heads(y, actions)[0])
            # A time-out is taken as the episode's end here (as is usual for rollouts).
            next_obs, env_state, reward, _, done, _ = env.step(k_env, env_state, action)
            state = reset_where(done, fresh, new_state)
            return (env_state, next_obs, state), (obs, action, reward, done)

        return jax.lax.scan(body, (env_state, obs, state), jr.split(key, length))

    def loss(params, start, rollout, last_value):
        observations, action, reward, done = rollout
        _, ys = unroll(params, start, observations, done)
        log_pi, value = heads(ys, actions)
        # Generalised advantage estimation (λ = 0.95), from the rollout's values held constant.
        values = jax.lax.stop_gradient(value)
        next_values = jnp.concatenate([values[1:], last_value[None]])
        deltas = reward + args.gamma * (1 - done) * next_values - values

        def gae(advantage, inputs):
            delta, done = inputs
            advantage = delta + args.gamma * 0.95 * (1 - done) * advantage
            return advantage, advantage

        _, advantages = jax.lax.scan(gae, jnp.zeros(n), (deltas, done), reverse=True)
        log_pi_a = jnp.take_along_axis(log_pi, action[..., None], axis=2)[..., 0]
        signal = eqtrace.modulated_loss(
            -log_pi_a - args.value_coef * value, advantages / (n * length)
        )
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1))
        return signal - args.entropy * entropy

    def body(carry, key):
        params, opt_state, env_state, obs, state, episodes = carry
        (env_state, obs, end_state), rollout = collect(params, env_state, obs, state, key)
        _, y_last = forward(params, end_state, obs)
        last_value = heads(y_last, actions)[1]
        grads = jax.grad(loss)(params, state, rollout, last_value)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        reward, done = rollout[2], rollout[3]
        episodes, ended = jax.lax.scan(lambda e, rd: e.update(*rd), episodes, (reward, done))
        return (params, opt_state, env_state, obs, end_state, episodes), ended

    @eqx.filter_jit
    def run(carry, keys):
        carry, (returns, done) = jax.lax.scan(body, carry, keys)
        return carry, (returns.reshape(-1, n), done.reshape(-1, n))

    k_reset, key = jr.split(key)
    obs, env_state = env.reset(k_reset, n)
    carry = (params, optimizer.init(params), env_state, obs, fresh, Episodes(jnp.zeros(n)))
    memory = length * sum(a.size for a in jax.tree.leaves(model.init_state()))
    return run, carry, key, args.steps // length, memory


def train(name, agent, args, env, model, key):
    """Runs an agent in `args.slices` slices; returns the mean return of the episodes that ended
    in each slice, and the timings."""
    from tqdm.auto import tqdm

    run, carry, key, calls, memory = agent(args, env, model, key)
    per_slice = max(calls // args.slices, 1)
    curve, compile_time, start = [], None, time.perf_counter()
    for _ in tqdm(range(args.slices), desc=name, ncols=90):
        key, subkey = jr.split(key)
        tic = time.perf_counter()
        carry, (returns, done) = run(carry, jr.split(subkey, per_slice))
        ended = float(jnp.sum(done))
        curve.append(float(jnp.sum(returns * done)) / ended if ended else float("nan"))
        compile_time = compile_time or time.perf_counter() - tic
    return curve, compile_time, time.perf_counter() - start, memory


def main(argv=None):
    args = parse_args(argv)
    env = Env(args.observe)
    key = jr.key(args.seed)
    model_key, run_key = jr.split(key)
    model = eqtrace.nn.Sequential(
        [
            eqtrace.nn.GRUCell(env.observation_size, args.hidden, key=model_key),
            eqx.nn.Linear(args.hidden, env.actions + 1, key=jr.fold_in(model_key, 1)),
        ]
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    agents = {"online": online_agent, "bptt": bptt_agent}
    names = {"online": f"{args.algorithm.upper().replace('DRTRL', 'D-RTRL')} + TD", "bptt": "BPTT"}
    print(
        f"CartPole-v1, observing {args.observe}; GRU({args.hidden}) + Linear actor-critic; "
        f"{args.envs} environments x {args.steps} steps per method"
    )
    results = {m: train(names[m], agents[m], args, env, model, run_key) for m in methods}

    slice_steps = args.steps // args.slices
    header = "env steps  " + "".join(f"{names[m]:>12}" for m in methods)
    print("\nmean return of the episodes that ended in each slice (max 500):")
    print(header)
    print("-" * len(header))
    for i in range(args.slices):
        row = "".join(f"{results[m][0][i]:12.1f}" for m in methods)
        print(f"{(i + 1) * slice_steps * args.envs:9,d}  {row}")
    print()
    table = f"{'method':<12}{'updates':>9}{'compile':>9}{'total':>9}{'memory/sample':>16}"
    print(table)
    print("-" * len(table))
    for m in methods:
        _, compile_time, total, memory = results[m]
        updates = args.steps if m == "online" else args.steps // args.rollout
        unit = "trace" if m == "online" else "states*"
        print(
            f"{names[m]:<12}{updates:>9,d}{compile_time:>8.1f}s{total:>8.1f}s"
            f"{memory:>9,d} {unit:<7}"
        )
    print(
        "* BPTT keeps the GRU states of a whole rollout; the online trace does not grow with "
        "time.\ncompile: the first slice, compilation included; total: all slices."
    )
    if args.plot:
        plt = pyplot()
        if plt is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            fig, ax = plt.subplots(figsize=(6, 4))
            steps = [(i + 1) * slice_steps * args.envs for i in range(args.slices)]
            for m in methods:
                ax.plot(steps, results[m][0], marker="o", label=names[m])
            ax.set_xlabel("environment steps (all environments)")
            ax.set_ylabel("mean episode return")
            ax.set_title(f"CartPole-v1 ({args.observe} observed)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.out / "reward_modulated.png", dpi=120)
            print(f"saved {args.out / 'reward_modulated.png'}")


if __name__ == "__main__":
    main()
