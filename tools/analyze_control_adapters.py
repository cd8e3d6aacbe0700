"""Per-layer health of a trained Control Adapter.

    python tools/analyze_control_adapters.py --adapter runs/ca/epoch1 [--no-gpu] [--json out.json]

Columns: orthogonality error ‖QᵀQ - I‖_F, effective rank of Q diag(λ), λ = expm1(S) (min / median / max),
condition number of Q, and how far class -1 undoes class +1 (‖T₊T₋ - I‖_F; 0 when QᵀQ = I).
"""

from lit_qlp.commands import analyze_control_adapters

if __name__ == "__main__":
    analyze_control_adapters()
