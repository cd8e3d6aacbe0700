"""Per-layer health of a trained Control Adapter.

    python tools/analyze_control_adapters.py --adapter runs/ca/epoch1 [--no-gpu] [--json out.json]

Columns: orthogonality error ‖QᵀQ - I‖_F, effective rank of Q diag(λ), λ = expm1(S) (min / median / max),
condition number of Q, and how far class -1 undoes class +1 (‖T₊T₋ - I‖_F; 0 when QᵀQ = I).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lit_qlp.export.control import analyze_control_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="Control Adapter directory (an epoch export)")
    parser.add_argument("--no-gpu", action="store_true", help="compute on the CPU even when a GPU is present")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.no_gpu else "cpu"
    rows = analyze_control_adapter(args.adapter, device)
    print("| layer | ‖QᵀQ-I‖ | eff. rank | λ min | λ median | λ max | cond(Q) | inverse error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['layer']} | {r['orthogonality']:.2e} | {r['effective_rank']:.2f} | {r['lambda_min']:+.4f} | "
            f"{r['lambda_median']:+.4f} | {r['lambda_max']:+.4f} | {r['condition']:.4f} | {r['inverse_error']:.2e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
