"""int8 (the engine's RowwiseInt8Linear: its native kernel where built, AVX2 or AVX512-VNNI as the CPU
has, else torch._int_mm; int8-torch forces torch._int_mm) vs int5 (the engine's native 5-bit kernel),
int8-weight-only and 4-bit weights (torch's CPU int4 kernel) per Linear shape.

For each of Qwen2.5-0.5B's Linear shapes (fused qkv, o, fused gate_up, down, output layer) and
M = 1, 4, 16 rows (--rows): the median time of one product, the methods alternated within every round
(a busy machine hits them alike), over --rounds rounds; the table gives the median of the
per-round medians, the spread (min-max of the rounds) and the ratio to int8. Then batch
invariance, bitwise: a row's output computed alone (M=1) and inside M = 2..16 with other rows.
Weights are random (N(0, 0.02)); speed does not depend on their values. Each method gets enough
copies of each product's weights to fill --working-set-mib (default 256, eight times this host's
32 MB L3), and the calls rotate through them: each call reads its weights from memory, as a decode
step does. With one copy (--working-set-mib 0) a matrix that fits the L3 is read from there, and
one-row figures flatter the kernels that are slow from memory (session 15 found "int5 on VNNI below
5 rows: nothing" that way; from memory it took 0.57-0.80x the time).

    python bench/linear_kernels.py [--rounds 5] [--threads 2] [--methods int8,int5,int8-weight-only] [--rows 1,16,128]
        [--working-set-mib 256]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from service.engine.model_runner import Int4Linear, Int5Linear, Int8WeightOnlyLinear, RowwiseInt8Linear  # noqa: E402

SHAPES = {"qkv": (896, 1152, True), "o": (896, 896, False), "gate_up": (896, 9728, False), "down": (4864, 896, False)}
HEAD = {"lm_head": (896, 151936, False)}


class TorchInt8Linear(RowwiseInt8Linear):
    """The same int8 Linear on torch._int_mm, as where the native kernel is not built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.torch_forward(x.reshape(-1, x.shape[-1]).float())


METHODS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int8": RowwiseInt8Linear,
    "int8-torch": TorchInt8Linear,
    "int5": Int5Linear,
    "int8-weight-only": Int8WeightOnlyLinear,
    "int4-g32": lambda lin: Int4Linear(lin, 32),
    "int4-g128": lambda lin: Int4Linear(lin, 128),
}


def _median_s(run: Callable[[], object], seconds: float) -> float:
    run()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _packed_bytes(module: nn.Module) -> int:
    return sum(tensor.nbytes for tensor in module.state_dict().values())


def _copies(make: Callable[[], nn.Module], working_set_bytes: int) -> list[nn.Module]:
    """Modules made by `make` until their weights fill working_set_bytes (at least one)."""
    modules = [make()]
    count = math.ceil(working_set_bytes / max(1, _packed_bytes(modules[0])))
    return modules + [make() for _ in range(count - 1)]


def _next_call(rotation: Iterator[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return next(rotation)(x)


def _invariant(module: nn.Module, k: int) -> bool:
    """Every row of a 16-row input, computed alone and inside M = 2, 3, 4, 7, 16: bitwise equal."""
    x = torch.randn(16, k)  # float32, as the engine's int8 and int4 runners call them
    alone = torch.cat([module(x[i : i + 1]) for i in range(16)])
    together = [module(torch.cat([x[: m - 1], x[i : i + 1]]))[-1] for m in (2, 3, 4, 7, 16) for i in range(16)]
    return all(torch.equal(row, alone[i % 16]) for row, i in zip(together, list(range(16)) * 5, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per method, shape, M and round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shapes", default=",".join([*SHAPES, *HEAD]))
    parser.add_argument("--rows", default="1,4,16", help="activation rows M of the products timed")
    parser.add_argument(
        "--working-set-mib", type=int, default=256, help="weights per method and shape, in copies called in turn"
    )
    args = parser.parse_args()
    ms = [int(m) for m in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    shapes = {name: {**SHAPES, **HEAD}[name] for name in args.shapes.split(",")}
    torch.manual_seed(0)
    copies: dict[tuple[str, str], list[nn.Module]] = {}
    for shape, (k, n, bias) in shapes.items():
        linear = nn.Linear(k, n, bias=bias)
        nn.init.normal_(linear.weight, std=0.02)
        for method in methods:
            copies[shape, method] = _copies(functools.partial(METHODS[method], linear), args.working_set_mib << 20)
    modules = {key: module_copies[0] for key, module_copies in copies.items()}
    rotations = {key: itertools.cycle(module_copies) for key, module_copies in copies.items()}
    times: dict[tuple[str, str, int], list[float]] = {key + (m,): [] for key in modules for m in ms}
    loads = []
    with torch.inference_mode():
        inputs = {(shape, m): torch.randn(m, k) for shape, (k, _, _) in shapes.items() for m in ms}
        for round_ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = methods if round_ % 2 == 0 else methods[::-1]
            for shape in shapes:
                for m in ms:
                    for method in order:
                        call = functools.partial(_next_call, rotations[shape, method], inputs[shape, m])
                        times[shape, method, m].append(_median_s(call, args.seconds))
        invariant = {key: _invariant(module, shapes[key[0]][0]) for key, module in modules.items()}
    print(
        f"threads {args.threads}, {args.rounds} rounds, load average (1 min) {min(loads):.1f}-{max(loads):.1f}, "
        f"{min(map(len, copies.values()))}-{max(map(len, copies.values()))} copies of each product's weights "
        f"(>= {args.working_set_mib} MiB) called in turn"
    )
    print(
        "| shape | method | "
        + " | ".join(f"M={m} µs (spread)" for m in ms)
        + " | "
        + " | ".join(f"M={m} vs int8" for m in ms)
        + " | batch-invariant |"
    )
    print("|---" * (3 + 2 * len(ms)) + "|")
    for shape in shapes:
        for method in methods:
            cells, ratios = [], []
            for m in ms:
                samples = times[shape, method, m]
                base = statistics.median(times[shape, methods[0], m])
                cells.append(
                    f"{statistics.median(samples) * 1e6:.0f} ({min(samples) * 1e6:.0f}-{max(samples) * 1e6:.0f})"
                )
                ratios.append(f"{statistics.median(samples) / base:.2f}")
            print(
                f"| {shape} | {method} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(ratios)
                + f" | {invariant[shape, method]} |"
            )


if __name__ == "__main__":
    main()
