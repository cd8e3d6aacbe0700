"""Convert a Control Adapter into a PEFT LoRA on mlp.down_proj (optionally also self_attn.o_proj).

    python tools/control_adapter_to_lora.py --base /models/Llama-3.1-8B --adapter runs/ca/epoch1 --output lora/
    python tools/control_adapter_to_lora.py ... --inverse        # the class -1 direction
    python tools/control_adapter_to_lora.py ... --o-proj         # also attention (exact for Cohere-style blocks)

B = Q diag(λ), A = Qᵀ W_down, so BA = Q diag(λ) Qᵀ W_down: exactly the MLP's share of the adapter at class +1
(or -1 with --inverse) at every position; see lit_qlp/export/control.py for what is and is not reproduced.
"""

from lit_qlp.commands import control_adapter_to_lora

if __name__ == "__main__":
    control_adapter_to_lora()
