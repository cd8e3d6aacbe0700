"""4-bit dequantisation and matmul costs per Llama-3-8B linear shape (bitsandbytes, CUDA).

    python tools/benchmark_dequant.py [--tokens 4096]

For each decoder projection shape: bf16 matmul time, bitsandbytes nf4 (double-quantised) dequantise time and
its effective bandwidth, and the time of bitsandbytes' forward (dequantise + matmul), all back to back on one
stream. On an H200 every dequantisation took 75-80 µs whatever its size (550 GB/s on a 4096 x 4096 weight,
1.8 TB/s on 14336 x 4096): the time is bitsandbytes' per-call overhead, not memory traffic.
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def timed(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3  # µs


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    print("| shape | matmul µs | dequant µs | dequant GB/s | bnb 4-bit matmul µs |")
    print("| --- | --- | --- | --- | --- |")
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        mm = timed(lambda: x @ w.T)
        dq = timed(lambda: bnbf.dequantize_4bit(packed, state))
        gb = (packed.numel() + w.numel() * 2) / (dq * 1e-6) / 1e9
        full = timed(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
        print(f"| {name} {out_f}x{in_f} | {mm:.0f} | {dq:.0f} | {gb:.0f} | {full:.0f} |")


if __name__ == "__main__":
    main()
