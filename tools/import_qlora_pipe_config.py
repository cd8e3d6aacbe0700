"""Convert a qlora-pipe-lite TOML training config into a lit-qlp YAML config.

    python tools/import_qlora_pipe_config.py config.toml [-o config.yaml]

Writes the YAML to stdout, or to the -o file (never over an existing one); then
``lit-qlp fit --config config.yaml``. Unknown keys and contradictory mode keys fail with one message that names
them; see lit_qlp/export/qlora_pipe.py for where each key goes and which defaults differ between the two programs.
"""

from lit_qlp.commands import import_qlora_pipe_config

if __name__ == "__main__":
    import_qlora_pipe_config()
