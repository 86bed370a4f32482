"""The optional plotting dependency of the examples, imported in one place."""


def pyplot():
    """`matplotlib.pyplot` with a file-only backend, or `None` (with a message) if matplotlib
    is not installed — the examples run without it and only skip their plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.")
        return None
    return plt
