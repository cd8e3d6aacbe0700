"""Turn a training checkpoint into the epoch export (PEFT adapter, Control Adapter or HF model directory).

    python tools/convert_ds_checkpoint.py --input CKPT_DIR --config CONFIG.yaml --output OUT

Example: --input runs/lora/checkpoints/last.ckpt --config runs/lora/config.yaml --output runs/lora/export.
The result equals what the run's epoch export writes. Also installed as lit-qlp-convert-ds-checkpoint.
"""

from lit_qlp.commands import convert_ds_checkpoint

if __name__ == "__main__":
    convert_ds_checkpoint()
