"""DDS against the devinterp LLC: the cost of one reading per checkpoint, measured side by side.

Checkpoints are cells of the reduced-rank regression grid (:func:`gaugeopt.dds.benchmarks.rrr_checkpoint`,
the known-answer benchmark of docs/dds.md). Per checkpoint, DDS reads both sites with one forward
and one backward pass over the n samples (timed as the median of ``dds_repeats`` readings after one
untimed warm-up), and the LLC runs devinterp's SGLD at the production budget of that benchmark
(4 chains x 1000 draws of 100 samples, step size 8e-4 and localization 10 as calibrated in
docs/dds.md). Only the cost is compared here; docs/dds.md compares what the two readings say.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

from gaugeopt.dds.benchmarks import half_squared_error, rrr_checkpoint
from gaugeopt.dds.llc import estimate_llc
from gaugeopt.dds.reading import dead_direction_signatures

SITES = ["A:output", "B:output"]
SGLD = dict(lr=8e-4, localization=10.0, num_chains=4, num_draws=1000, batch_size=100)


def compare_per_checkpoint(cells: list[tuple[int, int]], *, M: int = 10, N: int = 5, samples: int = 1000,
                           noise: float = 1.0, dds_repeats: int = 20, sgld: dict | None = None) -> dict:
    """Wall time of one DDS reading and of one LLC estimate at each ``(H, r)`` cell."""
    sgld = {**SGLD, **(sgld or {})}

    def loss(outputs, targets):  # the Gaussian negative log-likelihood of the benchmark
        return half_squared_error(outputs, targets) / noise**2

    rows = []
    for index, (H, r) in enumerate(cells):
        model, x, y = rrr_checkpoint(M, N, H, r, samples=samples, noise=noise, seed=index)
        dead_direction_signatures(model, x, y, loss=loss, sites=SITES)  # warm-up
        dds_times = []
        for _ in range(dds_repeats):
            start = time.perf_counter()
            dead_direction_signatures(model, x, y, loss=loss, sites=SITES)
            dds_times.append(time.perf_counter() - start)
        with contextlib.redirect_stderr(io.StringIO()):  # devinterp's per-chain progress bars
            estimate = estimate_llc(model, x, y, loss=loss, seed=index, **sgld)
        dds_s = statistics.median(dds_times)
        rows.append({"H": H, "r": r, "dds_s": dds_s, "llc_s": estimate.wall_time_s,
                     "llc_over_dds": estimate.wall_time_s / dds_s, "llc": estimate.llc_mean,
                     "llc_forward_backward_passes": estimate.forward_backward_passes,
                     "llc_samples_processed": estimate.samples_processed})
    return {"config": {"M": M, "N": N, "samples": samples, "noise": noise, "sites": SITES,
                       "dds_repeats": dds_repeats, "sgld": sgld},
            "cells": rows}
