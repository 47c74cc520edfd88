"""How the tests and the bench scripts compare a fast path with its float32 reference."""
from __future__ import annotations

import numpy as np


def rel_err(x, ref) -> float:
    """The relative error ‖x − ref‖ / ‖ref‖ (Frobenius norms over all elements), in float64.

    x, ref: arrays of one shape, any dtype. docs/spec.md §4 states the tolerances in this measure.
    """
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
