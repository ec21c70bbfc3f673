"""Median latency of an ONNX file in ONNX Runtime on CPU, the reference runner of this machine, the kernels it runs
for each layer, and where its time goes, node by node."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .parity import onnx_session

__all__ = ["INTEGER_KERNELS", "ort_kernels", "ort_latency_ms", "ort_latency_side_by_side", "ort_node_ms"]

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")


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


def ort_latency_side_by_side(
    files: Mapping[Hashable, str | os.PathLike],
    batch_sizes: Sequence[int],
    sample_shape: Sequence[int] | None = None,
    runs: int = 50,
    rounds: int = 3,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[Hashable, dict[int, float]]:
    """Per file (key -> path), per batch size, the best of `rounds` medians, the files taking turns in every round so
    that a busy moment or a drift in the machine's speed hits them alike: latencies to compare with each other.
    `sample_shape`: one input's shape; default: each file's own (its input's dimensions after the batch)."""
    best = {key: dict.fromkeys(batch_sizes, float("inf")) for key in files}
    shapes = {key: sample_shape or input_sample_shape(path) for key, path in files.items()}
    for _ in range(rounds):
        for key, path in files.items():
            for batch, ms in ort_latency_ms(path, shapes[key], batch_sizes, runs, warmup, threads).items():
                best[key][batch] = min(best[key][batch], ms)
    return best


def input_sample_shape(path: str | os.PathLike) -> list[int]:
    """The shape of one input of an ONNX file: its first input's dimensions after the batch, which must be fixed."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    if not dims or any(not d.HasField("dim_value") for d in dims):
        given = [d.dim_param or d.dim_value for d in dims]
        raise ValueError(f"{path}: its input's shape after the batch is not fixed ({given}): give the shape to time.")
    return [d.dim_value for d in dims]


def ort_kernels(path: str | os.PathLike) -> dict[str, str]:
    """Each Conv/Gemm/MatMul node of the file -> the op ONNX Runtime runs it as in a default session, read from the
    optimized graph it writes (not assumed): an integer kernel such as "QLinearConv", the op itself, or "float (fused)"
    where it became part of a node named after another (ONNX Runtime's float Conv+activation fusions)."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        onnxruntime.set_default_logger_severity(3)  # its note that the saved graph is specific to this CPU
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = [(n.name, n.op_type) for n in onnx.load(options.optimized_model_filepath).graph.node]
    kernels = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            same = [op for name, op in optimized if name == node.name or name.startswith(f"{node.name}_token")]
            kernels[node.name] = same[0] if same else "float (fused)"
    return kernels


def ort_node_ms(
    path: str | os.PathLike, sample_shape: Sequence[int], batch: int, runs: int = 50, warmup: int = 5
) -> dict[str, tuple[str, float]]:
    """Where a file's time goes: each node of the graph ONNX Runtime runs (its optimized one, fused nodes named as it
    names them) -> (its op, its median milliseconds per call), from ONNX Runtime's own profiler, default session
    options otherwise. A whole network's latency falls less than its multiply-accumulates where some layers run
    slower per multiply-accumulate once thinned; this says which."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch:
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *sample_shape), np.float32)}
        for _ in range(warmup + runs):
            session.run(None, x)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    ops = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            times.setdefault(name, []).append(event["dur"] / 1e3)
            ops[name] = event["args"]["op_name"]
    return {name: (ops[name], statistics.median(ms[warmup:])) for name, ms in times.items()}
