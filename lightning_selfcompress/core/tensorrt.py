"""A TensorRT engine from the exported ONNX file: build, save, run, time. Needs `tensorrt` (10 or 11) and a CUDA GPU.

The network is strongly typed (TensorRT 10's STRONGLY_TYPED flag; TensorRT 11 is always so), so INT8 comes only from
the file's explicit Q/DQ nodes, exactly where the export put them. The export's int4 files are not for TensorRT: its
INT4 is weight-only and block-wise (blocks of 64 or 128), not per output channel. `SPARSE_WEIGHTS` lets TensorRT use
sparse tensor cores for weights that are 2:4 along its axis. FP16 needs the weakly typed network of TensorRT 10 (a
strongly typed network takes its types from the file, which is float32). Buffers are torch CUDA tensors, timings CUDA
events.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SelfCompressError
from .atomic import atomic_path

__all__ = ["Engine", "EngineBuildError", "TensorRTUnavailable", "build_engine", "import_tensorrt"]

INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"


class TensorRTUnavailable(SelfCompressError, ImportError):
    """`tensorrt` is not installed, or there is no CUDA GPU to build for."""


class EngineBuildError(SelfCompressError, RuntimeError):
    """TensorRT parsed or built nothing; the message carries its own errors."""


def import_tensorrt():
    """The `tensorrt` module, or a clear error saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({error}). Its wheels come from NVIDIA's package index: `{INSTALL}` "
            "(or `pip install 'lightning_selfcompress[tensorrt]' --extra-index-url https://pypi.nvidia.com`)."
        ) from error
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU, and torch sees none.")
    return tensorrt


def _logger(trt):
    class Collect(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)

    return Collect()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    max_batch: int = 64,
    sparse_weights: bool = False,
    fp16: bool = False,
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Build a serialized engine for batches 1..`max_batch` (every batch it will run) from `onnx_path`; written
    atomically to `engine_path`. A file whose inputs all have fixed shapes (a latency table's chain) needs no batch
    range: it is built for those shapes alone."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1.")
    trt = import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    if fp16 and major >= 11:
        raise ValueError("fp16=True needs TensorRT 10's weakly typed networks; TensorRT 11 takes types from the file.")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # may be gone where always so
    flags = 0 if fp16 or strongly_typed is None else 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse '{onnx_path}': " + "; ".join(errors or logger.errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    dynamic = [t for t in (network.get_input(i) for i in range(network.num_inputs)) if -1 in tuple(t.shape)]
    if dynamic:  # the batch: the one dimension the export leaves free
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            sample = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (1, *sample), (max_batch, *sample), (max_batch, *sample))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from '{onnx_path}': " + "; ".join(logger.errors))
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    return Path(engine_path)


class Engine:
    """A deserialized engine, run on torch CUDA tensors: the exported network (one input, one output), or any graph
    of float inputs and outputs (a latency table's chain: several of each)."""

    def __init__(self, engine_path: str | os.PathLike) -> None:
        trt = import_tensorrt()
        self._logger = _logger(trt)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not load '{engine_path}': " + "; ".join(self._logger.errors))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
        }
        self.output_dtypes = {}
        for name in self.outputs:
            dtype = self.engine.get_tensor_dtype(name)
            if dtype not in dtypes:
                raise ValueError(f"Engine output '{name}' is {dtype}; float32, float16 or bfloat16 is supported.")
            self.output_dtypes[name] = dtypes[dtype]

    def __call__(self, *xs: Tensor) -> Tensor | list[Tensor]:
        """The output for inputs `xs` (in the engine's input order), computed on the current CUDA stream (the one
        torch orders the inputs and the result on); a list where the engine has several outputs."""
        if len(xs) != len(self.inputs):
            raise ValueError(f"The engine takes {len(self.inputs)} input(s), {self.inputs}; {len(xs)} given.")
        xs = tuple(x.detach().float().cuda().contiguous() for x in xs)
        self._logger.errors.clear()
        for name, x in zip(self.inputs, xs):
            if not self.context.set_input_shape(name, tuple(x.shape)):
                low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                raise ValueError(
                    f"Batch {x.shape[0]} (input shape {tuple(x.shape)}) is outside the engine's profile, {low} to "
                    f"{high}. Build the engine with max_batch >= {x.shape[0]}."
                )
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name, dtype in self.output_dtypes.items():
            outs.append(torch.empty(tuple(self.context.get_tensor_shape(name)), device=xs[0].device, dtype=dtype))
            self.context.set_tensor_address(name, outs[-1].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(xs[0].device).cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed: " + "; ".join(self._logger.errors))
        return outs[0] if len(outs) == 1 else outs

    @torch.no_grad()
    def median_ms(self, *xs: Tensor, runs: int = 100, warmup: int = 20) -> float:
        """Median milliseconds of a call on inputs `xs` (CUDA tensors), timed with CUDA events."""
        for _ in range(warmup):
            self(*xs)
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self(*xs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def latency_ms(
        self, sample_shape: Sequence[int], batch_sizes: Sequence[int], runs: int = 100, warmup: int = 20
    ) -> dict[int, float]:
        """Median milliseconds per batch of the one input, random, for each batch size."""
        return {b: self.median_ms(torch.randn(b, *sample_shape, device="cuda"), runs=runs, warmup=warmup)
                for b in batch_sizes}  # fmt: skip
