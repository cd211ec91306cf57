"""`dfm eval`'s gates (`--max-fid`, `--min-recall`, …): thresholds that make it a CI check.

Gates cannot pass by accident: a threshold on a metric that is not computed, or a NaN
threshold, is refused before any work (`check_gates`), and a NaN metric fails its gate.
"""

from __future__ import annotations

import math

from dfm_cli.errors import DfmError
from dfm_cli.evaluation.evaluate import METRICS, Request

# Gates: flag → (the metrics it reads, "max" or "min", the flag that computes them), from the
# metric registry (`evaluate.METRICS`).
GATES = {gate.flag: (gate.keys, gate.direction, metric.flag) for metric in METRICS for gate in metric.gates}


def check_gates(req: Request, limits: dict[str, float | None]) -> None:
    """Refuse, before any work, a threshold that could never fail: one on a metric this call
    does not compute, or one that is not a number.

    >>> check_gates(Request(swd=True), {"--max-fid": 50.0})
    Traceback (most recent call last):
    ...
    dfm_cli.errors.DfmError: --max-fid 50 gates a metric that is not computed; add --fid
    """
    for flag, limit in limits.items():
        if limit is None:
            continue
        if flag not in GATES:
            raise ValueError(f"unknown gate {flag}")  # a programming error, not the user's
        needs = GATES[flag][2]
        if math.isnan(limit):
            raise DfmError(f"{flag} {limit}: a threshold must be a number (NaN compares false and would always pass)")
        if not getattr(req, needs.lstrip("-")):
            raise DfmError(f"{flag} {limit:g} gates a metric that is not computed; add {needs}")


def check_thresholds(results: dict[str, float], limits: dict[str, float | None]) -> list[str]:
    """Messages for every gate that fails (`limits` keyed by flag): a metric beyond its
    threshold, a metric that is NaN, or a gated metric missing from `results`."""
    failed = []
    for flag, (names, direction, needs) in GATES.items():
        limit = limits.get(flag)
        if limit is None:
            continue
        present = [m for m in names if m in results]
        if not present:
            failed.append(f"{flag} {limit:g}: {names[0]} was not computed ({needs})")
        for metric in present:
            value = results[metric]
            if math.isnan(value) or math.isnan(limit):
                failed.append(f"{metric} {value:.4g} is not a number ({flag} {limit:g})")
            elif (direction == "max" and value > limit) or (direction == "min" and value < limit):
                failed.append(f"{metric} {value:.4g} {'>' if direction == 'max' else '<'} {flag} {limit:g}")
    return failed
