"""Median latency of an ONNX file in ONNX Runtime on CPU, the reference runner of this machine."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from .parity import onnx_session

__all__ = ["ort_latency_ms"]


def ort_latency_ms(
    path: str | os.PathLike,
    sample_shape: Sequence[int],
    batch_sizes: Sequence[int],
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[int, float]:
    """Median milliseconds per call of `path` on random inputs, for each batch size."""
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    medians = {}
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *sample_shape), dtype=np.float32)
        for _ in range(warmup):
            session.run(None, {name: x})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {name: x})
            times.append(1e3 * (time.perf_counter() - start))
        medians[batch] = statistics.median(times)
    return medians
