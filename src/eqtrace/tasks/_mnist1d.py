"""MNIST-1D, generated locally by the `mnist1d` package."""

import random

import numpy as np

from ._batch import check_int


def mnist1d(seed: int = 42, *, num_samples: int = 5000) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus and Kobak, 2020): ten classes of one-dimensional signals of 40
    scalars, generated on the spot from ten templates by the `mnist1d` package (no
    download). The network reads one scalar per step and classifies the sequence, usually at
    the last step.

    Needs the `mnist1d` package (`pip install mnist1d`, or the `examples` or `test` extras of
    eqtrace). The generation is seeded; NumPy's and Python's global random states, which the
    package seeds, are restored afterwards.

    **Arguments:**

    - `seed`: the seed of the generation; the same seed gives the same data set.
    - `num_samples`: the number of sequences, 80 % for training and 20 % for testing (the
      package's default 5 000: 4 000 and 1 000). Rounded down to a multiple of 10 (the same
      number per class).

    **Returns:** a dict of NumPy arrays, sample-major: `x_train` `(N, 40, 1)` and `x_test`
    float32, standardised with the training set's mean and standard deviation; `y_train`
    `(N,)` and `y_test` int32 labels. For a batch in the time-major layout of a `jax.vmap`ped
    step, `np.swapaxes(x_train[indices], 0, 1)` gives `(40, B, 1)`.
    """
    check_int("mnist1d", "seed", seed, 0)
    check_int("mnist1d", "num_samples", num_samples, 10)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError(
            "eqtrace.tasks.mnist1d needs the `mnist1d` package, which generates the data set: "
            "`pip install mnist1d` (or `pip install eqtrace[examples]`)."
        ) from error

    args = get_dataset_args()  # 80 % for training, length 40
    vars(args).update(seed=seed, num_samples=num_samples)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)  # generated locally from templates; `args.url` is not used
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    mean, std = data["x"].mean(), data["x"].std()

    def prepare(x):
        return ((x - mean) / std).astype(np.float32)[..., None]

    return {
        "x_train": prepare(data["x"]),
        "y_train": data["y"].astype(np.int32),
        "x_test": prepare(data["x_test"]),
        "y_test": data["y_test"].astype(np.int32),
    }
