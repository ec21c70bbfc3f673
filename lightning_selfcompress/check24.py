"""`lsc-check24 PATH`: which Conv/Linear weights of a model are 2:4-sparse along the axis TensorRT reads.

PATH is an ONNX file (Conv weights [K, C, R, S]; Gemm and MatMul weights, transposed as the node reads them;
integer weights as stored, behind the DequantizeLinear or Cast+Mul that dequantizes them) or a PyTorch checkpoint /
state_dict (every 2-D or 4-D `*.weight`, as Linear [out, in] and conv [K, C, R, S]).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from .report import make_console
from .core.checkpoint import read_checkpoint
from .core.export import stored_weights
from .core.sparsity import as_rows, is_24

__all__ = ["WeightCheck", "check_onnx", "check_path", "check_state_dict", "main"]


@dataclass(frozen=True)
class WeightCheck:
    name: str
    op: str
    shape: tuple[int, ...]
    sparse: bool
    fraction_zero: float


def _check(name: str, op: str, weight: torch.Tensor) -> WeightCheck:
    """`weight` as the layer reads it: [out, in] or [K, C, *kernel]."""
    rows = as_rows(weight)
    return WeightCheck(name, op, tuple(weight.shape), is_24(weight), float((rows == 0).float().mean()))


def check_state_dict(state_dict: dict[str, torch.Tensor]) -> list[WeightCheck]:
    return [
        _check(name, "Linear" if t.dim() == 2 else "Conv", t)
        for name, t in state_dict.items()
        if name.endswith(".weight") and isinstance(t, torch.Tensor) and t.dim() in (2, 4) and t.is_floating_point()
    ]


def check_onnx(path: str | Path) -> list[WeightCheck]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    integers = {name: ints for name, (ints, _) in stored_weights(model).items()}

    def weight(name: str) -> np.ndarray | None:
        return integers[name] if name in integers else initializers.get(name)

    checks = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        index = 0 if node.op_type == "MatMul" and weight(node.input[0]) is not None else 1
        array = weight(node.input[index])
        if array is None or array.ndim < 2:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            tensor = tensor if trans_b else tensor.T  # as [out, in]
        elif node.op_type == "MatMul":
            tensor = tensor.T if index == 1 else tensor  # x @ W: W is [in, out]
        checks.append(_check(node.input[index], node.op_type, tensor))
    return checks


def check_path(path: str | Path) -> list[WeightCheck]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give an ONNX file or a PyTorch checkpoint.")
    if path.suffix == ".onnx":
        return check_onnx(path)
    state = read_checkpoint(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint or state_dict.")
    return check_state_dict(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="an .onnx file, or a PyTorch checkpoint / state_dict")
    args = parser.parse_args(argv)
    checks = check_path(args.path)
    table = Table(title=f"2:4 along TensorRT's axis: {args.path}")
    for column in ("weight", "op", "shape", "zeros", "2:4"):
        table.add_column(column, justify="left" if column in ("weight", "op") else "right")
    for c in checks:
        table.add_row(c.name, c.op, "x".join(map(str, c.shape)), f"{100 * c.fraction_zero:.0f}%",
                      "[green]yes[/green]" if c.sparse else "no")  # fmt: skip
    console = make_console()
    console.print(table)
    console.print(f"{sum(c.sparse for c in checks)} of {len(checks)} weights are 2:4.")


if __name__ == "__main__":
    main()
