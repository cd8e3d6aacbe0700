"""Convert a Control Adapter into a PEFT LoRA on mlp.down_proj (optionally also self_attn.o_proj).

    python tools/control_adapter_to_lora.py --base /models/Llama-3.1-8B --adapter runs/ca/epoch1 --output lora/
    python tools/control_adapter_to_lora.py ... --inverse        # the class -1 direction
    python tools/control_adapter_to_lora.py ... --o-proj         # also attention (exact for Cohere-style blocks)

B = Q diag(λ), A = Qᵀ W_down, so BA = Q diag(λ) Qᵀ W_down: exactly the MLP's share of the adapter at class +1
(or -1 with --inverse) at every position; see lit_qlp/export/control.py for what is and is not reproduced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_qlp.export.control import control_adapter_to_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="base model directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="Control Adapter directory (an epoch export)")
    parser.add_argument("--output", type=Path, required=True, help="new directory for the PEFT LoRA")
    parser.add_argument("--inverse", action="store_true", help="convert class -1 (λ = expm1(-S))")
    parser.add_argument("--o-proj", action="store_true", help="also target self_attn.o_proj")
    args = parser.parse_args()
    tensors = control_adapter_to_lora(args.base, args.adapter, args.output, args.inverse, args.o_proj)
    print(f"wrote {len(tensors)} tensors to {args.output}")


if __name__ == "__main__":
    main()
