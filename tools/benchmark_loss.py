"""LM-head loss benchmark on one GPU: time and peak memory of forward + backward, materialised logits against fused.

    python tools/benchmark_loss.py --seq 4096 --hidden 4096 --vocabs 32000,128256,256000

For each vocabulary size and head (frozen: only the hidden states get a gradient, as with LoRA; trainable: the head
weight gets one too, as in full fine-tuning), with bf16 hidden states [seq, hidden] and head weight [vocab, hidden]:

- ``torch``: ``F.cross_entropy((hidden @ W.T).float(), labels, reduction="sum")``, the usual recipe.
- ``triton-ce``: ``cross_entropy(hidden @ W.T, labels)``: the Triton kernel on the materialised bf16 logits.
- ``fused``: ``fused_head_loss(hidden, W, labels, chunk_size=--chunk-size)``: Triton per token chunk.
- ``fused-torch``: the same with ``implementation="torch"``, for comparison.

Time: median of ``--iters`` forward + backward passes (CUDA events) after ``--warmup`` passes (Triton compiles in the
first). Peak: ``torch.cuda.max_memory_allocated`` over one forward + backward, reset before each case; "extra" is the
peak minus what the inputs (hidden states, weight, labels) hold. ``--softcap`` applies Gemma-2 softcapping in all four.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_qlp.kernels import cross_entropy, fused_head_loss

METHODS = ("torch", "triton-ce", "fused", "fused-torch")
GIB = 1 << 30


def make_step(
    method: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None, chunk: int
) -> Callable[[], None]:
    """One forward + backward of ``method``."""

    def torch_step() -> None:
        logits = (hidden @ weight.T).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        F.cross_entropy(logits, labels, reduction="sum").backward()

    def triton_ce_step() -> None:
        cross_entropy(hidden @ weight.T, labels, softcap=softcap, implementation="triton").backward()

    def fused_step(implementation: str) -> None:
        loss_sum, _ = fused_head_loss(
            hidden, weight, labels, softcap=softcap, chunk_size=chunk, implementation=implementation
        )
        loss_sum.backward()

    steps = {
        "torch": torch_step,
        "triton-ce": triton_ce_step,
        "fused": lambda: fused_step("triton"),
        "fused-torch": lambda: fused_step("torch"),
    }
    return steps[method]


def measure(step: Callable[[], None], params: list[torch.Tensor], warmup: int, iters: int) -> tuple[float, int, int]:
    """(median milliseconds, peak bytes, peak bytes above what was allocated before the step) of ``step``."""

    def run() -> None:
        step()
        for p in params:
            p.grad = None

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        for p in params:
            p.grad = None
    return statistics.median(times), peak, peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="tokens (one sequence)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size")
    parser.add_argument("--vocabs", default="32000,128256,256000", help="comma-separated vocabulary sizes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--chunk-size", type=int, default=1024, help="fused_head_loss's tokens per chunk")
    parser.add_argument("--softcap", type=float, default=None, help="final-logit softcap, e.g. 30 (Gemma 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods {sorted(unknown)} unknown; choose from {METHODS}")

    print(f"# {torch.cuda.get_device_name()}, seq {args.seq}, hidden {args.hidden}, bf16, chunk {args.chunk_size}")
    header = f"| {'vocab':>6} | {'head':<9} | {'method':<11} | {'ms':>7} | {'peak GiB':>8} | {'extra GiB':>9} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for trainable in (False, True):
            hidden = torch.randn(args.seq, args.hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
            weight = torch.randn(vocab, args.hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
            weight = (weight / args.hidden**0.5).requires_grad_(trainable)
            hidden.requires_grad_()
            labels = torch.randint(0, vocab, (args.seq,), device="cuda", generator=generator)
            for method in methods:
                step = make_step(method, hidden, weight, labels, args.softcap, args.chunk_size)
                try:
                    ms, peak, extra = measure(step, [hidden, weight], args.warmup, args.iters)
                    cells = f"{ms:7.2f} | {peak / GIB:8.2f} | {extra / GIB:9.2f}"
                except torch.cuda.OutOfMemoryError:
                    hidden.grad = weight.grad = None
                    cells = f"{'OOM':>7} | {'':>8} | {'':>9}"
                head = "trainable" if trainable else "frozen"
                print(f"| {vocab:>6} | {head:<9} | {method:<11} | {cells} |", flush=True)
            del hidden, weight, labels
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
