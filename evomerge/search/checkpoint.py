"""Algorithm checkpoints: pymoo's state plus the global random states some algorithms draw from.

cloudpickle, not pickle: pymoo builds operators from closures (its random-state decorator) that
plain pickle refuses. CMA-ES samples through numpy's global generator, so its state travels too:
without it a resumed CMA-ES asks for other genomes than an uninterrupted run. An algorithm that
holds a live generator (pymoo's MOEA/D, and CMA-ES, whose pickled form silently drops it) cannot
be saved; ``dumps`` returns None and the search resumes it by replaying the archive from the
start instead, which rebuilds the same state without evaluating anything again.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np


def dumps(algorithm: Any, **fields: Any) -> bytes | None:
    import inspect

    import cloudpickle

    if any(inspect.isgenerator(value) for value in vars(algorithm).values()):
        return None  # a live generator (CMA-ES's, which pymoo drops when pickled) cannot be saved

    state = {"algorithm": algorithm, "numpy_random": np.random.get_state(),
             "python_random": random.getstate(), **fields}
    try:
        return cloudpickle.dumps(state)
    except (TypeError, pickle.PicklingError):
        return None


def loads(data: bytes) -> dict[str, Any]:
    """The saved state; restores the global random states as a side effect."""
    state = pickle.loads(data)
    np.random.set_state(state.pop("numpy_random"))
    random.setstate(state.pop("python_random"))
    return state
