"""Channel surgery on every torchvision classifier: `python bench/zoo.py [--models resnet18 vgg11 ...] [--out FILE]`.

Per model (weights=None, 10 classes, a batch of 4 at 64 x 64 or the side it needs, float64; the large vision
transformers built for small images, 4 x 4 patches, as the issue's "very large ones at small inputs"): running statistics
made non-trivial and then frozen, dropout and stochastic depth off (their masks are drawn per call), quantizers
attached, 30% of the
removable channel groups and 30% of each residual branch's channels killed, then `Surgeon.find()` and `remove()`.
The outputs before and after are compared in train and in eval mode. Status: `exact` (largest relative difference
<= 1e-5 in both modes), `refused` (a GraphError naming what the graph cannot follow), `wrong` (a difference past
1e-5) or `crashed` (any other exception). Writes a markdown table (docs/pages/zoo.md by default).
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_selfcompress.core.groups import ChannelGraph, GraphError
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.testing import (
    choose_branch_channels, choose_groups, kill_branch_channels, kill_groups, randomize_zero_weights,
)  # fmt: skip

INPUT = {"inception_v3": 75, "vit": 224, "maxvit": 224}  # the sides they need; others 64
SMALL_IMAGES = {"vit_l_16": 64, "vit_l_32": 128, "vit_h_14": 56}  # built for these sides (4 x 4 patches)


STATUSES = ("exact", "refused", "wrong", "crashed", "not run")


def side(name: str) -> int:
    return SMALL_IMAGES.get(name) or next((s for prefix, s in INPUT.items() if name.startswith(prefix)), 64)


def survey(name: str, max_params: float) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    row = {"model": name, "status": "", "detail": "", "groups_removed": 0, "branch_channels": 0}
    try:
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        if name in SMALL_IMAGES:
            kwargs["image_size"] = SMALL_IMAGES[name]
        net = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        params = sum(p.numel() for p in net.parameters())
        if params > max_params:
            row.update(status="not run", detail=f"{params / 1e6:.0f} M parameters, past --max-params", seconds=0.0)
            return row
        net = net.double()
        randomize_zero_weights(net)
        # 4 samples: train-mode BatchNorm over 2 samples of 1 x 1 amplifies round-off past 1e-5 (RegNet at 32 x 32)
        x = torch.randn(4, 3, side(name), side(name), dtype=torch.float64)
        with torch.no_grad():
            net.train()(x)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
            if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
                m.p = 0.0
        attach_quantizers(net)
        graph = ChannelGraph(net, x)
        killed = choose_groups(graph, 0.3)
        cuts = choose_branch_channels(graph, 0.3, spare=killed)
        kill_groups(graph, killed)
        kill_branch_channels(graph, cuts)
        before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
        surgeon = Surgeon(graph)
        removal = surgeon.find()
        surgeon.remove(removal)
        with torch.no_grad():
            worst = max(float((net.train(m)(x) - before[m]).abs().max() / before[m].abs().max()) for m in (True, False))
        row.update(status="exact" if worst <= 1e-5 else "wrong", detail=f"max relative difference {worst:.1e}",
                   groups_removed=int(removal.groups.sum()), branch_channels=int(sum(c.sum() for c in cuts.values())))
    except GraphError as error:
        row.update(status="refused", detail=str(error).split(". Surgery refuses")[0])
    except Exception as error:  # noqa: BLE001 - the survey reports every failure
        row.update(status="crashed", detail=f"{type(error).__name__}: {error}".splitlines()[0])
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=torchvision.models.list_models(module=torchvision.models))
    parser.add_argument("--out", type=Path, default=Path("docs/pages/zoo.md"))
    parser.add_argument("--max-params", type=float, default=700e6, help="skip larger models (float64: 8 bytes each)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(survey(name, args.max_params))
        print(rows[-1], flush=True)
        write_table(rows, args.out)  # after every model: a long survey cut short keeps what it found
    print({s: sum(r["status"] == s for r in rows) for s in STATUSES})


def write_table(rows: list[dict], out: Path) -> None:
    lines = ["| model | status | groups removed | branch channels | seconds | detail |",
             "| --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    lines += [f"| {r['model']} | {r['status']} | {r['groups_removed']} | {r['branch_channels']} | {r['seconds']:.1f} | "
              f"{r['detail'].replace('|', '/')} |" for r in rows]  # fmt: skip
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = f"{len(rows)} models: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    out.write_text(summary + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
