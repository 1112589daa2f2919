"""DDS against the devinterp LLC: the cost of one reading per checkpoint, measured side by side.

Checkpoints are cells of the reduced-rank regression grid (:func:`gaugeopt.experiments.rrr.rrr_checkpoint`,
the known-answer benchmark of docs/dds.md). Per checkpoint, DDS reads both sites with one forward
and one backward pass over the n samples (timed as the median of ``dds_repeats`` readings after one
untimed warm-up), and the LLC runs devinterp's SGLD under the calibrated protocol of the ``rrr``
experiment (full batch, 4 chains of 1000 burn-in steps + 1000 draws, localization 1, step size 1e-4,
the middle of the range the rrr calibration settles in). Only the cost is compared here;
docs/dds.md compares what the two readings say.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

from gaugeopt.experiments.common import half_squared_error
from gaugeopt.experiments.rrr import rrr_checkpoint
from gaugeopt.dds.llc import estimate_llc
from gaugeopt.dds.reading import dead_direction_signatures

SITES = ["A:output", "B:output"]
SGLD = dict(lr=1e-4, localization=1.0, num_chains=4, num_draws=1000, num_burnin_steps=1000, batch_size=1000)


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
