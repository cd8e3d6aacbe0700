"""torch's SDPA kernels side by side on one attention shape: forward and forward + backward time and TFLOP/s.

    python tools/benchmark_attention.py --seq 65536                       # Llama-3-8B's attention: 32/8 heads of 128
    python tools/benchmark_attention.py --seq 4096 --backends cudnn,flash
    python tools/benchmark_attention.py --device cpu --seq 512 --dtype float32 --backends flash,math   # anywhere

Causal attention of one sequence, bf16 by default, on random inputs. Each backend named runs alone
(``lit_qlp.models.pipeline.sdpa_priority([backend])``, the setting behind ``model.sdpa_backends``), with the key and
value heads grouped (``enable_gqa``, as transformers calls SDPA without a mask on CUDA) and repeated to the query
heads (as it calls SDPA with a mask). A backend that does not take the call says torch's reason instead of a time.
FLOPs: 4 · seq² · head_dim · heads / 2 for the causal forward, 2.5 times that for the backward.

Which kernel runs decides the long-context step: at 64k tokens the attention is, by its FLOPs, about two thirds of
a Llama-3-8B QLoRA step (README, Long context); ``model.sdpa_backends: [cudnn, flash]`` chooses cuDNN's kernel
where it is faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import synchronize  # noqa: E402  (tools/, this script's directory)

from lit_qlp.models.pipeline import SDPA_BACKENDS, sdpa_priority  # noqa: E402

BACKWARD_FACTOR = 2.5
"""FLOPs of the backward pass against the forward's (five matmuls against two)."""


def time_call(function, device: str, repeats: int) -> float:
    """Median seconds of ``function()`` after one untimed call."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(args, backend: str, grouped: bool) -> dict:
    """Forward and forward + backward of ``backend`` on the shape of ``args``: seconds and TFLOP/s, or the error."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def make(heads: int) -> torch.Tensor:
        shape = (1, heads, args.seq, args.head_dim)
        return torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(True)

    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    repeat = args.heads // args.kv_heads

    def forward() -> torch.Tensor:
        key, value = (k, v) if grouped else (k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1))
        return F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=grouped)

    def forward_backward() -> None:
        forward().backward(torch.ones(q.shape, device=device, dtype=dtype))
        q.grad = k.grad = v.grad = None

    flops = 4 * args.seq**2 * args.head_dim * args.heads / 2
    row = {"backend": backend, "kv": "grouped" if grouped else "repeated"}
    try:
        with sdpa_priority([backend]):
            with torch.no_grad():
                row["forward_s"] = time_call(forward, args.device, args.repeats)
            row["step_s"] = time_call(forward_backward, args.device, args.repeats)
    except RuntimeError as error:
        row["error"] = str(error).splitlines()[0][:120]
        return row
    row["forward_tflops"] = flops / row["forward_s"] / 1e12
    row["step_tflops"] = flops * (1 + BACKWARD_FACTOR) / row["step_s"] / 1e12
    return row


def table(args, rows: list[dict]) -> str:
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        f"causal attention, seq {args.seq}, {args.heads}/{args.kv_heads} heads of {args.head_dim}, {args.dtype}, "
        f"{name}, torch {torch.__version__}",
        "| backend | key/value heads | forward s | forward TFLOP/s | forward+backward s | forward+backward TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['kv']} | does not take the call: {row['error']} | | | |")
        else:
            lines.append(
                f"| {row['backend']} | {row['kv']} | {row['forward_s']:.4f} | {row['forward_tflops']:.1f} | "
                f"{row['step_s']:.4f} | {row['step_tflops']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536, help="tokens of the sequence")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (a divisor of --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--backends", default="cudnn,flash,efficient", help="comma-separated: " + ",".join(SDPA_BACKENDS)
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each (the median counts)")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in SDPA_BACKENDS]
    if unknown:
        parser.error(f"--backends: {', '.join(unknown)} is not one of {', '.join(SDPA_BACKENDS)}")
    if args.seq < 1 or args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error("--seq, --heads and --kv-heads must be positive, and --kv-heads must divide --heads")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = [measure(args, backend, grouped) for backend in backends for grouped in (True, False)]
    print(table(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
