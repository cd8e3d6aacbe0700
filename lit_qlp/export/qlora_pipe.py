"""qlora-pipe-lite TOML configs as lit-qlp YAML configs (library code of tools/import_qlora_pipe_config.py).

``import_qlora_pipe_config`` reads a qlora-pipe-lite training config (``deepspeed train.py --config X.toml``) and
returns the nested dict of the equivalent ``lit-qlp fit --config`` file; ``KNOWN_KEYS`` and ``DATASET_KEYS`` say
where each key goes. Only the keys the TOML sets are written (besides ``model.method.class_path``, ``model.dtype``,
``trainer.accelerator``, ``trainer.devices`` and the strategy's class), so every other option keeps lit-qlp's
default. Where the two programs' defaults differ:

- ``evals_per_epoch``: qlora-pipe-lite 10, lit-qlp 1.
- ``partition_method``: qlora-pipe-lite "uniform", lit-qlp "compute".
- ``eval_gradient_accumulation_steps``: qlora-pipe-lite 1, lit-qlp ``gradient_accumulation_steps``.
- ``output_dir``: qlora-pipe-lite writes each run into a new timestamped directory below it; lit-qlp uses
  ``trainer.default_root_dir`` itself (``--ckpt_path last`` resumes there).
- GPUs: qlora-pipe-lite takes the process count from its launcher; the import sets ``trainer.devices`` to
  ``pipeline_stages`` (one data-parallel replica): raise it to a multiple of ``pipeline_stages`` for more.

qlora-pipe-lite's switches make two independent choices in lit-qlp. What trains, ``model.method``:
``full_fine_tune`` -> ``lit_qlp.methods.FullFineTuning``, ``use_control_adapters`` -> ``ControlAdapters``, neither
-> ``LoRA``. How the frozen base is held, ``model.base``: ``load_in_4bit`` -> ``lit_qlp.bases.BitsAndBytes4bit``
with ``quant_type: nf4`` and ``double_quant: false`` (the format qlora-pipe-lite quantises to), so QLoRA is LoRA on
that base and a Control Adapter on a 4-bit model is ``ControlAdapters`` on it; full fine-tuning refuses it.

The adapter keys become the method's ``init_args`` (``lora_rank`` -> ``rank``, ...), written only for a method that
takes them: a key the method lacks is an error naming it (where qlora-pipe-lite mostly ignores it), unless its value
asks for nothing (0, false, an empty list or string), when it is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# lit-qlp's Adam betas when the TOML sets only one of beta1/beta2 (qlora-pipe-lite's defaults are the same).
DEFAULT_BETAS = (0.9, 0.99)

# Keys copied as they are: qlora-pipe-lite key -> (section, lit-qlp key). "strategy" is
# trainer.strategy.init_args. The order is the order of the YAML.
_PLAIN: dict[str, tuple[str, str]] = {
    "model_dir": ("model", "model_dir"),
    "output_dir": ("trainer", "default_root_dir"),
    "lr": ("model", "lr"),
    "eps": ("model", "eps"),
    "epochs": ("trainer", "max_epochs"),
    "pipeline_stages": ("strategy", "pipeline_stages"),
    "gradient_accumulation_steps": ("strategy", "gradient_accumulation_steps"),
    "partition_method": ("strategy", "partition_method"),
    "use_column_major_topology": ("strategy", "use_column_major_topology"),
    "sequence_len": ("data", "sequence_len"),
    "eval_fraction": ("data", "eval_fraction"),
    "evals_per_epoch": ("data", "evals_per_epoch"),
    "eval_gradient_accumulation_steps": ("data", "eval_gradient_accumulation_steps"),
    "max_sequences": ("data", "max_sequences"),
    "drop_tails": ("data", "drop_tails"),
    "mix_datasets": ("data", "mix_datasets"),
    "sequence_prefix": ("data", "sequence_prefix"),
    "document_prefix": ("data", "document_prefix"),
    "document_suffix": ("data", "document_suffix"),
    "mask_tokens": ("data", "mask_tokens"),
    "checkpoint_interval_hours": ("checkpoint", "checkpoint_interval_hours"),
    "max_checkpoints": ("checkpoint", "max_checkpoints"),
}

_SECTION_PATHS = {
    "model": "model",
    "trainer": "trainer",
    "strategy": "trainer.strategy.init_args",
    "data": "data",
    "checkpoint": "checkpoint",
}

_MODE_KEYS = ("full_fine_tune", "load_in_4bit", "use_control_adapters")

LORA = "lit_qlp.methods.LoRA"
CONTROL_ADAPTERS = "lit_qlp.methods.ControlAdapters"
FULL_FINE_TUNING = "lit_qlp.methods.FullFineTuning"
BITSANDBYTES_4BIT = "lit_qlp.bases.BitsAndBytes4bit"

# What each method is called in error messages, with the switch that selects it.
_METHOD_NAMES = {
    LORA: "LoRA",
    CONTROL_ADAPTERS: "Control Adapters (use_control_adapters = true)",
    FULL_FINE_TUNING: "full fine-tuning (full_fine_tune = true)",
}

# Keys that become model.method.init_args: qlora-pipe-lite key -> (init_args name, the methods that take it).
# The order is the order of the YAML.
_METHOD_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_rank": ("rank", (LORA, CONTROL_ADAPTERS)),
    "lora_dropout": ("dropout", (LORA, CONTROL_ADAPTERS)),
    "target_modules": ("target_modules", (LORA, FULL_FINE_TUNING)),
    "layers_to_transform": ("layers_to_transform", (LORA, CONTROL_ADAPTERS, FULL_FINE_TUNING)),
    "lora_weight_dtype": ("weight_dtype", (LORA, CONTROL_ADAPTERS)),
    "lora_weight_decay": ("weight_decay", (LORA, CONTROL_ADAPTERS)),
    "control_adapter_gamma": ("gamma", (CONTROL_ADAPTERS,)),
}

# Why a method has no place for a key, where the generic "remove it" needs a reason.
_NOT_TAKEN_REASONS = {
    ("target_modules", CONTROL_ADAPTERS): "Control Adapters act on whole decoder layers, which layers_to_transform "
    "selects",
    ("lora_weight_decay", FULL_FINE_TUNING): "it decays LoRA/Control Adapter weights, and full fine-tuning trains none",
    ("control_adapter_gamma", LORA): "it keeps Control Adapters' Q orthonormal",
    ("control_adapter_gamma", FULL_FINE_TUNING): "it keeps Control Adapters' Q orthonormal",
}

DATASET_KEYS: dict[str, str] = {
    "dataset_path": "data.datasets[i].dataset_path",
    "max_tokens": "data.datasets[i].max_tokens",
    "control_class": "data.datasets[i].control_class",
}
"""The keys of a ``[[datasets]]`` table -> where the import puts them."""

KNOWN_KEYS: dict[str, str] = {
    **{key: f"{_SECTION_PATHS[section]}.{name}" for key, (section, name) in _PLAIN.items()},
    **{
        key: f"model.method.init_args.{name} (of {', '.join(c.rsplit('.', 1)[1] for c in methods)})"
        for key, (name, methods) in _METHOD_OPTIONS.items()
    },
    "pipeline_stages": "trainer.strategy.init_args.pipeline_stages and trainer.devices",
    "full_fine_tune": f"model.method.class_path: {FULL_FINE_TUNING}",
    "load_in_4bit": f"model.base.class_path: {BITSANDBYTES_4BIT} (quant_type nf4, double_quant false)",
    "use_control_adapters": f"model.method.class_path: {CONTROL_ADAPTERS}",
    "beta1": f"model.betas[0] (model.betas[1] defaults to {DEFAULT_BETAS[1]})",
    "beta2": f"model.betas[1] (model.betas[0] defaults to {DEFAULT_BETAS[0]})",
    "datasets": "data.datasets ([[datasets]] tables with " + ", ".join(DATASET_KEYS) + ")",
}
"""The top-level qlora-pipe-lite keys the import supports -> where it puts them."""

# qlora-pipe-lite keys (some from older versions) that lit-qlp has no place for, with what to do instead.
_TOP_LEVEL_HINTS = {
    "lora_alpha": "lit-qlp fixes alpha to lora_rank; scale lr instead",
    "evals_per_run": "older qlora-pipe-lite; use evals_per_epoch",
    "checkpoint_interval": "older qlora-pipe-lite, in minutes; use checkpoint_interval_hours",
}
_DATASET_HINTS = {
    "document_prefix": "per dataset in older qlora-pipe-lite; lit-qlp takes one top-level document_prefix",
    "document_suffix": "per dataset in older qlora-pipe-lite; lit-qlp takes one top-level document_suffix",
}

# lit-qlp's layer selection grammar (lit_qlp.adapters.targeting.parse_layer_ranges): "a" or "a:b", comma-separated.
_LAYER_ITEM = re.compile(r"(\d+)(?::(\d+))?")


def import_qlora_pipe_config(toml_text_or_path: str | Path) -> dict[str, Any]:
    """Converts a qlora-pipe-lite TOML training config into a lit-qlp config.

    ``full_fine_tune`` and ``use_control_adapters`` select ``model.method`` (``FullFineTuning``,
    ``ControlAdapters``; neither: ``LoRA``), ``load_in_4bit`` selects ``model.base`` (``BitsAndBytes4bit``); the
    adapter keys become the method's ``init_args`` and the other keys map one to one (see ``KNOWN_KEYS`` and
    ``DATASET_KEYS``). Values keep their TOML types, except an integer ``layers_to_transform``, which becomes the
    string lit-qlp reads.

    Args:
        toml_text_or_path: A path (``Path``, or a string naming an existing file or containing no ``=``) of a
            TOML file, or the TOML text itself.

    Returns:
        The lit-qlp config as nested dicts (``trainer``, ``model``, ``data`` and, when the TOML sets checkpoint
        keys, ``checkpoint``), ready for ``yaml.safe_dump(..., sort_keys=False)`` and ``lit-qlp fit --config``.

    Raises:
        FileNotFoundError: for a path that names no file.
        ValueError: for invalid TOML; for unknown keys (one error listing all of them and the supported keys);
            for contradictory switches (``full_fine_tune`` with ``load_in_4bit`` or ``use_control_adapters``);
            for an adapter key the chosen method does not take (e.g. ``control_adapter_gamma`` without
            ``use_control_adapters``); for a missing ``model_dir`` or ``[[datasets]]``; and for values lit-qlp
            cannot take (each error names the key and value and says what to change).
    """
    config, source = _load(toml_text_or_path)
    _check_unknown_keys(config, source)
    for key in _MODE_KEYS + ("drop_tails", "mix_datasets", "use_column_major_topology"):
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"{source}: {key}={config[key]!r} must be true or false")
    method_class = _method(config, source)
    if "model_dir" not in config:
        raise ValueError(f"{source}: model_dir is missing; set it to the Hugging Face model directory to train")

    trainer: dict[str, Any] = {"accelerator": "gpu", "devices": config.get("pipeline_stages", 1)}
    strategy: dict[str, Any] = {}
    model: dict[str, Any] = {"model_dir": config["model_dir"], "dtype": "bfloat16"}
    model["method"] = _method_config(method_class, config, source)
    if config.get("load_in_4bit", False):
        model["base"] = {
            "class_path": BITSANDBYTES_4BIT,
            "init_args": {"quant_type": "nf4", "double_quant": False},
        }
    data: dict[str, Any] = {"datasets": _datasets(config, source)}
    checkpoint: dict[str, Any] = {}
    sections = {"trainer": trainer, "strategy": strategy, "model": model, "data": data, "checkpoint": checkpoint}

    betas = None
    if "beta1" in config or "beta2" in config:
        betas = [config.get("beta1", DEFAULT_BETAS[0]), config.get("beta2", DEFAULT_BETAS[1])]
    for key, (section, name) in _PLAIN.items():
        if key in config:
            sections[section][name] = config[key]
            if key == "lr" and betas is not None:
                model["betas"] = betas  # next to lr, as in configs/*.yaml
    if betas is not None:
        model["betas"] = betas

    trainer["strategy"] = {"class_path": "lit_qlp.strategies.PipelineStrategy"}
    if strategy:
        trainer["strategy"]["init_args"] = strategy
    result: dict[str, Any] = {"trainer": trainer, "model": model, "data": data}
    if checkpoint:
        result["checkpoint"] = checkpoint
    return result


def _toml_module():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10; tomli is the same parser
        try:
            import tomli as tomllib
        except ModuleNotFoundError as error:
            raise RuntimeError("reading TOML needs Python >= 3.11 (tomllib) or `pip install tomli`") from error
    return tomllib


def _load(toml_text_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed TOML and a name of where it came from, for error messages."""
    tomllib = _toml_module()
    text = toml_text_or_path
    source = "qlora-pipe-lite config"
    if isinstance(toml_text_or_path, Path) or (
        "\n" not in toml_text_or_path and (_is_file(toml_text_or_path) or "=" not in toml_text_or_path)
    ):
        path = Path(toml_text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"qlora-pipe-lite config {str(path)!r} is not a file; pass a TOML file or its text")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML ({error}); fix the file's syntax") from error


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, or one with a NUL byte
        return False


def _check_unknown_keys(config: dict[str, Any], source: str) -> None:
    """Raises one ValueError listing every key (top level and in [[datasets]]) that the import does not know."""
    unknown = [(key, _TOP_LEVEL_HINTS.get(key)) for key in config if key not in KNOWN_KEYS]
    datasets = config.get("datasets")
    if isinstance(datasets, list):
        for i, table in enumerate(datasets):
            if isinstance(table, dict):
                unknown += [(f"datasets[{i}].{k}", _DATASET_HINTS.get(k)) for k in table if k not in DATASET_KEYS]
    if not unknown:
        return
    listed = ", ".join(f"{name!r} ({hint})" if hint else repr(name) for name, hint in unknown)
    raise ValueError(
        f"{source}: {len(unknown)} key(s) that lit-qlp's qlora-pipe-lite import does not know: {listed}. "
        "Remove or rename them (settings without a counterpart have to be dropped). "
        f"Supported keys: {', '.join(KNOWN_KEYS)}; in [[datasets]] tables: {', '.join(DATASET_KEYS)}."
    )


def _method(config: dict[str, Any], source: str) -> str:
    """``model.method.class_path`` from qlora-pipe-lite's switches; contradictory combinations raise ValueError."""
    full = config.get("full_fine_tune", False)
    four_bit = config.get("load_in_4bit", False)
    control = config.get("use_control_adapters", False)
    if full and four_bit:
        raise ValueError(
            f"{source}: full_fine_tune=true and load_in_4bit=true contradict each other (4-bit weights cannot be "
            "fine-tuned; qlora-pipe-lite silently ignores load_in_4bit); remove load_in_4bit for full fine-tuning "
            "or full_fine_tune for QLoRA"
        )
    if full and control:
        raise ValueError(
            f"{source}: full_fine_tune=true and use_control_adapters=true contradict each other; remove "
            "use_control_adapters for full fine-tuning or full_fine_tune for Control Adapters"
        )
    return FULL_FINE_TUNING if full else CONTROL_ADAPTERS if control else LORA


def _method_config(method_class: str, config: dict[str, Any], source: str) -> dict[str, Any]:
    """``model.method``: its class and, when the TOML sets any of them, the ``init_args`` it takes."""
    init_args: dict[str, Any] = {}
    for key, (name, methods) in _METHOD_OPTIONS.items():
        if key not in config:
            continue
        value = config[key]
        if method_class not in methods:
            if value in (0, False, [], ""):  # asks for nothing: qlora-pipe-lite ignores it too
                continue
            reason = _NOT_TAKEN_REASONS.get((key, method_class))
            takers = " and ".join(_METHOD_NAMES[m] for m in methods)
            raise ValueError(
                f"{source}: {key}={value!r} sets model.method.init_args.{name} of {takers}, but this config trains "
                f"{_METHOD_NAMES[method_class]}, which has no {name}" + (f" ({reason})" if reason else "") + "; "
                f"remove {key}"
            )
        if key == "target_modules":
            value = _target_modules(value, source)
        elif key == "layers_to_transform":
            value = _layers_to_transform(value, source)
        init_args[name] = value
    return {"class_path": method_class, "init_args": init_args} if init_args else {"class_path": method_class}


def _datasets(config: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """``data.datasets`` from the [[datasets]] tables."""
    datasets = config.get("datasets")
    if datasets is None:
        raise ValueError(f"{source}: no [[datasets]] table; add one with dataset_path = '...' per dataset")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise ValueError(f"{source}: datasets={datasets!r} must be [[datasets]] tables, each with dataset_path = '...'")
    result = []
    for i, table in enumerate(datasets):
        if not isinstance(table.get("dataset_path"), str):
            raise ValueError(
                f"{source}: datasets[{i}] has dataset_path={table.get('dataset_path')!r}; give each [[datasets]] "
                "table a dataset_path string (a file or glob pattern)"
            )
        result.append({key: table[key] for key in DATASET_KEYS if key in table})
    return result


def _target_modules(value: Any, source: str) -> str | list[str]:
    """``target_modules`` as lit-qlp reads it: "all-linear" or a list of module names."""
    if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        return value
    raise ValueError(
        f"{source}: target_modules={value!r}: lit-qlp takes 'all-linear' or a non-empty list of module names "
        "(a string other than 'all-linear' is a PEFT regular expression, which lit-qlp does not read); "
        "write the modules out, e.g. target_modules = ['q_proj', 'v_proj']"
    )


def _layers_to_transform(value: Any, source: str) -> str:
    """``layers_to_transform`` in lit-qlp's grammar ("0:31", "0:10,20:25,30"); an integer becomes its string."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"{source}: layers_to_transform={value!r} must be a string of layers and inclusive ranges such as "
            "'0:31' or '0:10,20:25,30'"
        )
    # qlora-pipe-lite strips blanks around items and colons and skips empty items: write the canonical form.
    items = [re.sub(r"\s+", "", item) for item in value.split(",")]
    items = [item for item in items if item]
    for item in items:
        match = _LAYER_ITEM.fullmatch(item)
        if not match:
            raise ValueError(
                f"{source}: layers_to_transform={value!r}: cannot read {item!r}; use layer indices and inclusive "
                "ranges such as '0:10,20:25,30'"
            )
        if match.group(2) is not None and int(match.group(2)) < int(match.group(1)):
            raise ValueError(
                f"{source}: layers_to_transform={value!r}: range {item!r} runs backwards (qlora-pipe-lite reads it "
                f"as no layers); write it as '{match.group(2)}:{match.group(1)}' or remove it"
            )
    return ",".join(items)


__all__ = ["DATASET_KEYS", "DEFAULT_BETAS", "KNOWN_KEYS", "import_qlora_pipe_config"]


def render(config: dict, source: Path) -> str:
    """The YAML text of ``config`` with a header comment naming the TOML file it came from.

    Args:
        config: The lit-qlp config from ``import_qlora_pipe_config``.
        source: The qlora-pipe-lite TOML file.

    Returns:
        The header comment followed by ``yaml.safe_dump(config, sort_keys=False)``.
    """
    stages = config["trainer"].get("strategy", {}).get("init_args", {}).get("pipeline_stages", 1)
    header = (
        f"# Converted from the qlora-pipe-lite config {source.resolve()}\n"
        "# by tools/import_qlora_pipe_config.py. Run: lit-qlp fit --config <this file>\n"
        f"# trainer.devices is pipeline_stages ({stages}): one data-parallel replica. qlora-pipe-lite took the GPU\n"
        "# count from its launcher: for data parallelism set trainer.devices to it (a multiple of pipeline_stages).\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)
