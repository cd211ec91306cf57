"""Seeds derived from (run seed, purpose, index), so any step can be replayed on its own."""

import numpy as np

DATA_ORDER, SAMPLE_DRAWS, MODEL_INIT, BATCH_STAGE, SAMPLE_NOISE = 0, 1, 2, 3, 4


def mix_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 63-bit seed for (run seed, purpose, epoch or step)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))
