"""Seeds derived from (run seed, purpose, index), so any step can be replayed on its own."""

import numpy as np

DATA_ORDER, STEP_NOISE, MODEL_INIT = 0, 1, 2


def mix_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, epoch or step)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))
