"""qlora-pipe-lite TOML configs -> lit-qlp YAML (lit_qlp.export.qlora_pipe, tools/import_qlora_pipe_config.py).

Each mode's TOML (as many qlora-pipe-lite keys as apply) is converted, written as YAML and parsed by the real CLI
(``lit-qlp fit --config X --print_config``, in-process); the printed configuration must hold the TOML's values at
the places listed in ``PLACES`` below, which is written independently of the module's own table. TOMLs with the
keys and switches of qlora-pipe-lite's four example configs (values of our own) must convert to the expected
``model.method`` and ``model.base``, with options the method classes take. Nothing trains.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_qlp.cli import main
from lit_qlp.export.qlora_pipe import DATASET_KEYS, KNOWN_KEYS, import_qlora_pipe_config

pytestmark = pytest.mark.usefixtures("clean_process_state")  # tests/conftest.py: the CLI runs in this process

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "import_qlora_pipe_config.py"

# Where the printed lit-qlp config holds each qlora-pipe-lite key that maps one to one.
PLACES = {
    "model_dir": ("model", "model_dir"),
    "output_dir": ("trainer", "default_root_dir"),
    "lora_rank": ("model", "method", "init_args", "rank"),
    "lora_dropout": ("model", "method", "init_args", "dropout"),
    "lora_weight_dtype": ("model", "method", "init_args", "weight_dtype"),
    "lora_weight_decay": ("model", "method", "init_args", "weight_decay"),
    "control_adapter_gamma": ("model", "method", "init_args", "gamma"),
    "target_modules": ("model", "method", "init_args", "target_modules"),
    "layers_to_transform": ("model", "method", "init_args", "layers_to_transform"),
    "lr": ("model", "lr"),
    "eps": ("model", "eps"),
    "epochs": ("trainer", "max_epochs"),
    "pipeline_stages": ("trainer", "strategy", "init_args", "pipeline_stages"),
    "gradient_accumulation_steps": ("trainer", "strategy", "init_args", "gradient_accumulation_steps"),
    "partition_method": ("trainer", "strategy", "init_args", "partition_method"),
    "use_column_major_topology": ("trainer", "strategy", "init_args", "use_column_major_topology"),
    "sequence_len": ("data", "sequence_len"),
    "eval_gradient_accumulation_steps": ("data", "eval_gradient_accumulation_steps"),
    "eval_fraction": ("data", "eval_fraction"),
    "evals_per_epoch": ("data", "evals_per_epoch"),
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
SPECIAL = {"full_fine_tune", "load_in_4bit", "use_control_adapters", "beta1", "beta2", "datasets"}

LORA = "lit_qlp.methods.LoRA"
CONTROL = "lit_qlp.methods.ControlAdapters"
FULL = "lit_qlp.methods.FullFineTuning"
# qlora-pipe-lite quantises to nf4 without double quantisation.
BASE_4BIT = {"class_path": "lit_qlp.bases.BitsAndBytes4bit", "init_args": {"quant_type": "nf4", "double_quant": False}}

# mode_config's modes -> (model.method.class_path, model.base or None).
MODES = {
    "lora": (LORA, None),
    "qlora": (LORA, BASE_4BIT),
    "full": (FULL, None),
    "control": (CONTROL, None),
    "control_4bit": (CONTROL, BASE_4BIT),
}


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    """The tiny llama and two small jsonl datasets."""
    directory = tmp_path_factory.mktemp("qlora_pipe_data")
    files = {}
    for name in ("wanted", "unwanted", "neutral"):
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": f"w{i} w2 w3"}) + "\n" for i in range(20)))
    return {"model_dir": Path(tiny_model("llama")), **files}


def toml_text(config: dict) -> str:
    """TOML of ``config``: scalars, lists and (last) the ``datasets`` array of tables."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [f"{key} = {value(v)}" for key, v in config.items() if key != "datasets"]
    for table in config.get("datasets", []):
        lines += ["", "[[datasets]]", *(f"{key} = {value(v)}" for key, v in table.items())]
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == config  # the test's own TOML writer is faithful
    return text


def mode_config(mode: str, assets, root: Path) -> dict:
    """A qlora-pipe-lite config of ``mode`` setting every key that applies to it."""
    common = {
        "model_dir": str(assets["model_dir"]),
        "output_dir": str(root),
        "lr": 3.0e-5,
        "beta1": 0.85,
        "beta2": 0.95,
        "eps": 1.0e-7,
        "epochs": 2,
        "sequence_len": 128,
        "pipeline_stages": 2,
        "gradient_accumulation_steps": 8,
        "eval_gradient_accumulation_steps": 2,
        "partition_method": "uniform",
        "use_column_major_topology": True,
        "eval_fraction": 0.02,
        "evals_per_epoch": 5,
        "checkpoint_interval_hours": 0.5,
        "max_checkpoints": 2,
        "max_sequences": 1000,
        "drop_tails": True,
        "mix_datasets": True,
        "sequence_prefix": "",
        "document_prefix": "<doc>",
        "document_suffix": [2],
        "mask_tokens": True,
        "datasets": [
            {"dataset_path": str(assets["wanted"]), "max_tokens": 5000},
            {"dataset_path": str(assets["neutral"])},
        ],
    }
    lora = {"lora_rank": 8, "lora_dropout": 0.05, "lora_weight_dtype": "float32", "lora_weight_decay": 10.0}
    if mode == "lora":
        return {
            **common,
            **lora,
            "target_modules": ["q_proj", "v_proj"],
            "layers_to_transform": "0:1",
        }
    if mode == "qlora":
        config = {**common, "load_in_4bit": True, **lora, "lora_weight_dtype": "bfloat16", "lora_weight_decay": 0.0}
        del config["beta1"]  # beta1 falls back to lit-qlp's 0.9
        return {
            **config,
            "target_modules": "all-linear",
            "layers_to_transform": "0:1,3",
            "sequence_prefix": 1,
            "document_suffix": "",
            "mask_tokens": [0, 2],
        }
    if mode == "full":
        config = {**common, "full_fine_tune": True, "load_in_4bit": False, "use_control_adapters": False}
        del config["beta2"]  # beta2 falls back to lit-qlp's 0.99
        return {
            **config,
            "target_modules": ["self_attn", "mlp"],
            "layers_to_transform": "1:2",
            "lr": 1.0e-5,
            "partition_method": "type:decoderlayerpipe",
            "sequence_prefix": [1],
            "document_suffix": "</s>",
            "mask_tokens": 2,
        }
    assert mode in ("control", "control_4bit")
    four_bit = {"load_in_4bit": True} if mode == "control_4bit" else {}
    return {
        **common,
        "use_control_adapters": True,
        **four_bit,
        **lora,
        "lora_rank": 4,
        "lora_dropout": 0.1,
        "lora_weight_decay": 100,
        "control_adapter_gamma": 0.25,
        "layers_to_transform": "1:3",
        "datasets": [
            {"dataset_path": str(assets["wanted"]), "control_class": 1, "max_tokens": 4000},
            {"dataset_path": str(assets["unwanted"]), "control_class": -1, "max_tokens": 4000},
            {"dataset_path": str(assets["neutral"]), "control_class": 0},
        ],
    }


def run_cli(args: list[str]) -> int:
    """Runs the CLI in-process; the exit code (0 when it returns normally)."""
    try:
        main(args)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return 0


def at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_config_parses_with_toml_values(mode, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    toml_config = mode_config(mode, assets, tmp_path / "root")
    assert set(toml_config) <= set(KNOWN_KEYS)
    toml_path = tmp_path / "config.toml"
    toml_path.write_text(toml_text(toml_config))
    converted = import_qlora_pipe_config(toml_path)
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(yaml.safe_dump(converted, sort_keys=False))
    assert yaml.safe_load(yaml_path.read_text()) == converted  # e.g. '1:3' stays quoted text

    code = run_cli(["fit", "--config", str(yaml_path), "--print_config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    printed = yaml.safe_load(captured.out)

    assert set(toml_config) - SPECIAL <= set(PLACES)
    for key, value in toml_config.items():
        if key in PLACES:
            assert at(converted, PLACES[key]) == value and type(at(converted, PLACES[key])) is type(value), key
            assert at(printed, PLACES[key]) == value, key
    method, base = MODES[mode]
    assert converted["model"]["method"]["class_path"] == printed["model"]["method"]["class_path"] == method
    assert converted["model"].get("base") == base
    if base is None:
        assert printed["model"].get("base") is None
    else:
        assert printed["model"]["base"] == base
    assert printed["model"]["dtype"] == "bfloat16"
    assert printed["trainer"]["accelerator"] == "gpu"
    assert printed["trainer"]["devices"] == toml_config["pipeline_stages"]
    assert printed["trainer"]["strategy"]["class_path"] == "lit_qlp.strategies.PipelineStrategy"
    assert printed["model"]["betas"] == [toml_config.get("beta1", 0.9), toml_config.get("beta2", 0.99)]
    datasets = printed["data"]["datasets"]
    assert [{k: d[k] for k in table} for d, table in zip(datasets, toml_config["datasets"])] == toml_config["datasets"]
    assert len(datasets) == len(toml_config["datasets"])
    assert not (tmp_path / "root").exists(), "--print_config wrote into default_root_dir"


def test_minimal_config_leaves_lit_qlp_defaults():
    converted = import_qlora_pipe_config("model_dir = '/m'\n[[datasets]]\ndataset_path = 'd.jsonl'\n")
    assert converted == {
        "trainer": {
            "accelerator": "gpu",
            "devices": 1,
            "strategy": {"class_path": "lit_qlp.strategies.PipelineStrategy"},
        },
        "model": {"model_dir": "/m", "dtype": "bfloat16", "method": {"class_path": LORA}},
        "data": {"datasets": [{"dataset_path": "d.jsonl"}]},
    }


def test_layer_selection_forms():
    base = "model_dir = '/m'\n[[datasets]]\ndataset_path = 'd'\n"

    def layers(spec: str):
        converted = import_qlora_pipe_config(f"layers_to_transform = {spec}\n" + base)
        return converted["model"]["method"]["init_args"]["layers_to_transform"]

    assert layers("'0:31'") == "0:31"
    assert layers("'0:10,20:25,30'") == "0:10,20:25,30"
    assert layers("'0 : 2, 5, 7:8,'") == "0:2,5,7:8"  # qlora-pipe-lite's blanks and empty items
    assert layers("5") == "5"  # qlora-pipe-lite also takes a single integer
    with pytest.raises(ValueError, match=r"layers_to_transform='3:1'.*'1:3'"):
        layers("'3:1'")
    with pytest.raises(ValueError, match=r"layers_to_transform='0-3'.*cannot read '0-3'"):
        layers("'0-3'")


def test_path_and_text_inputs(tmp_path):
    text = "model_dir = '/m'\nlr = 1e-4\n[[datasets]]\ndataset_path = 'd'\n"
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert import_qlora_pipe_config(path) == import_qlora_pipe_config(str(path)) == import_qlora_pipe_config(text)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        import_qlora_pipe_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match=r"c2.toml: not valid TOML"):
        (tmp_path / "c2.toml").write_text("model_dir = \n")
        import_qlora_pipe_config(tmp_path / "c2.toml")


# ----------------------------------------------------------------------------------- qlora-pipe-lite's examples

# The top-level keys each example config of qlora-pipe-lite (examples/config_*.toml) sets, in its order, and the
# keys of its [[datasets]] tables; the values below are our own.
EXAMPLE_KEYS = {
    "lora": "model_dir output_dir lora_rank lora_dropout lora_weight_dtype lora_weight_decay".split(),
    "qlora": "model_dir output_dir load_in_4bit lora_rank lora_dropout lora_weight_dtype lora_weight_decay".split(),
    "full_finetune": "model_dir output_dir full_fine_tune".split(),
    "control_adapter": (
        "model_dir output_dir use_control_adapters load_in_4bit lora_rank lora_dropout lora_weight_dtype "
        "lora_weight_decay control_adapter_gamma"
    ).split(),
}
EXAMPLE_COMMON_KEYS = (
    "lr epochs beta1 beta2 eps sequence_len pipeline_stages gradient_accumulation_steps "
    "eval_gradient_accumulation_steps eval_fraction evals_per_epoch checkpoint_interval_hours max_checkpoints"
).split()
EXAMPLE_DATASET_KEYS = {
    "lora": [["dataset_path"], ["dataset_path", "max_tokens"]],
    "qlora": [["dataset_path"], ["dataset_path", "max_tokens"]],
    "full_finetune": [["dataset_path"], ["dataset_path", "max_tokens"]],
    "control_adapter": [["dataset_path", "control_class", "max_tokens"]] * 3,
}
EXAMPLE_EXPECTED = {
    "lora": (LORA, None),
    "qlora": (LORA, BASE_4BIT),
    "full_finetune": (FULL, None),
    "control_adapter": (CONTROL, BASE_4BIT),
}
EXAMPLE_VALUES = {
    "model_dir": "/models/tiny",
    "output_dir": "runs/example",
    "full_fine_tune": True,
    "load_in_4bit": True,
    "use_control_adapters": True,
    "lora_rank": 32,
    "lora_dropout": 0.05,
    "lora_weight_dtype": "float32",
    "lora_weight_decay": 25.0,
    "control_adapter_gamma": 0.4,
    "lr": 5.0e-5,
    "epochs": 3,
    "beta1": 0.8,
    "beta2": 0.95,
    "eps": 1.0e-8,
    "sequence_len": 2048,
    "pipeline_stages": 2,
    "gradient_accumulation_steps": 4,
    "eval_gradient_accumulation_steps": 2,
    "eval_fraction": 0.05,
    "evals_per_epoch": 4,
    "checkpoint_interval_hours": 2,
    "max_checkpoints": 5,
}
EXAMPLE_DATASET_VALUES = [
    {"dataset_path": "data/a.jsonl", "control_class": 1, "max_tokens": 1000},
    {"dataset_path": "data/b/*.txt", "control_class": -1, "max_tokens": 2000},
    {"dataset_path": "data/c.parquet", "control_class": 0, "max_tokens": 300},
]


def example_config(example: str) -> dict:
    """A qlora-pipe-lite config with the keys and switches of ``examples/config_{example}.toml``."""
    config = {key: EXAMPLE_VALUES[key] for key in EXAMPLE_KEYS[example] + EXAMPLE_COMMON_KEYS}
    config["datasets"] = [
        {key: values[key] for key in keys}
        for keys, values in zip(EXAMPLE_DATASET_KEYS[example], EXAMPLE_DATASET_VALUES)
    ]
    return config


@pytest.mark.parametrize("example", list(EXAMPLE_KEYS))
def test_example_configs_convert(example, tmp_path):
    toml_config = example_config(example)
    path = tmp_path / f"config_{example}.toml"
    path.write_text(toml_text(toml_config))
    converted = import_qlora_pipe_config(path)

    method, base = EXAMPLE_EXPECTED[example]
    model = converted["model"]
    assert model["method"]["class_path"] == method
    assert model.get("base") == base
    assert set(toml_config) - SPECIAL <= set(PLACES)
    for key, value in toml_config.items():
        if key in PLACES:
            assert at(converted, PLACES[key]) == value and type(at(converted, PLACES[key])) is type(value), key
    method_keys = [key for key in toml_config if PLACES.get(key, ())[:2] == ("model", "method")]
    assert list(model["method"].get("init_args", {})) == [PLACES[key][-1] for key in method_keys]
    assert model["betas"] == [toml_config["beta1"], toml_config["beta2"]]
    assert converted["trainer"]["devices"] == toml_config["pipeline_stages"]
    assert converted["data"]["datasets"] == toml_config["datasets"]
    assert list(model) == ["model_dir", "dtype", "method", *(["base"] if base else []), "lr", "betas", "eps"]


def class_of(class_path: str):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("example", list(EXAMPLE_KEYS))
def test_example_options_are_the_classes_own(example):
    """The CLI rejects init_args a class does not take: each written option is a parameter of its class, and the
    method builds from them (the base is only checked by signature: building it needs bitsandbytes)."""
    model = import_qlora_pipe_config(toml_text(example_config(example)))["model"]
    method = class_of(model["method"]["class_path"])
    init_args = model["method"].get("init_args", {})
    assert set(init_args) <= set(inspect.signature(method).parameters)
    method(**init_args)
    if "base" in model:
        assert set(model["base"]["init_args"]) <= set(
            inspect.signature(class_of(model["base"]["class_path"])).parameters
        )


def test_control_adapters_on_a_4bit_base():
    converted = import_qlora_pipe_config(
        "model_dir = '/m'\nuse_control_adapters = true\nload_in_4bit = true\ncontrol_adapter_gamma = 0.25\n"
        "[[datasets]]\ndataset_path = 'd'\ncontrol_class = 1\n"
    )
    assert converted["model"]["method"] == {"class_path": CONTROL, "init_args": {"gamma": 0.25}}
    assert converted["model"]["base"] == BASE_4BIT


@pytest.mark.parametrize(
    "lines",
    [
        "full_fine_tune = true\nlora_weight_decay = 0.0",
        "full_fine_tune = true\nlora_dropout = 0.0",
        "use_control_adapters = true\ntarget_modules = []",
    ],
)
def test_options_that_ask_for_nothing_are_dropped(lines):
    converted = import_qlora_pipe_config(f"model_dir = '/m'\n{lines}\n[[datasets]]\ndataset_path = 'd'\n")
    assert "init_args" not in converted["model"]["method"]


# ----------------------------------------------------------------------------------------------------- errors


def test_unknown_keys_listed_in_one_error():
    text = toml_text(
        {
            "model_dir": "/m",
            "lora_alpha": 64,
            "evals_per_run": 5,
            "learning_rate": 1e-4,
            "datasets": [{"dataset_path": "a", "document_suffix": "<EOT>"}, {"dataset_path": "b", "weight": 2}],
        }
    )
    with pytest.raises(ValueError) as error:
        import_qlora_pipe_config(text)
    message = str(error.value)
    for name in ("'lora_alpha'", "'evals_per_run'", "'learning_rate'", "'datasets[0].document_suffix'"):
        assert name in message
    assert "'datasets[1].weight'" in message and "5 key(s)" in message
    assert "scale lr instead" in message and "use evals_per_epoch" in message  # hints for known qlora-pipe-lite keys
    assert "Supported keys: model_dir, output_dir" in message and "evals_per_epoch" in message
    assert "[[datasets]] tables: dataset_path, max_tokens, control_class" in message
    assert list(DATASET_KEYS) == ["dataset_path", "max_tokens", "control_class"]


@pytest.mark.parametrize(
    "first, second", [("full_fine_tune", "load_in_4bit"), ("full_fine_tune", "use_control_adapters")]
)
def test_contradictory_mode_keys(first, second):
    text = f"model_dir = '/m'\n{first} = true\n{second} = true\n[[datasets]]\ndataset_path = 'd'\n"
    with pytest.raises(ValueError) as error:
        import_qlora_pipe_config(text)
    assert f"{first}=true" in str(error.value) and f"{second}=true" in str(error.value)
    assert "remove" in str(error.value)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        ("full_fine_tune = 'yes'", r"full_fine_tune='yes' must be true or false"),
        ("target_modules = '.*proj'", r"target_modules='.\*proj'.*\['q_proj', 'v_proj'\]"),
        ("target_modules = []", r"target_modules=\[\]: lit-qlp takes 'all-linear' or a non-empty list"),
        ("use_control_adapters = true\ntarget_modules = ['q_proj']", r"target_modules=\['q_proj'\].*remove target_mod"),
        ("full_fine_tune = true\nlora_weight_decay = 1.0", r"lora_weight_decay=1.0.*remove lora_weight_decay"),
        ("control_adapter_gamma = 0.25", r"control_adapter_gamma=0.25 .*this config trains LoRA.*remove control_adap"),
        ("full_fine_tune = true\ncontrol_adapter_gamma = 0.5", r"control_adapter_gamma=0.5 .*remove control_adapter"),
        ("full_fine_tune = true\nlora_rank = 16", r"lora_rank=16 .*full fine-tuning.*no rank; remove lora_rank"),
        ("full_fine_tune = true\nlora_dropout = 0.1", r"lora_dropout=0.1 .*no dropout; remove lora_dropout"),
        ("full_fine_tune = true\nlora_weight_dtype = 'float32'", r"lora_weight_dtype='float32'.*remove lora_weight"),
    ],
)
def test_values_lit_qlp_cannot_take(lines, pattern):
    with pytest.raises(ValueError, match=pattern):
        import_qlora_pipe_config(f"model_dir = '/m'\n{lines}\n[[datasets]]\ndataset_path = 'd'\n")


def test_missing_model_dir_and_datasets():
    with pytest.raises(ValueError, match=r"model_dir is missing"):
        import_qlora_pipe_config("lr = 1e-4\n[[datasets]]\ndataset_path = 'd'\n")
    with pytest.raises(ValueError, match=r"no \[\[datasets\]\] table"):
        import_qlora_pipe_config("model_dir = '/m'\n")
    with pytest.raises(ValueError, match=r"datasets\[0\] has dataset_path=None"):
        import_qlora_pipe_config("model_dir = '/m'\n[[datasets]]\nmax_tokens = 5\n")


# ----------------------------------------------------------------------------------------------------- script


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_script(tmp_path):
    toml_path = tmp_path / "config.toml"
    toml_path.write_text(
        "model_dir = '/m'\nuse_control_adapters = true\nlayers_to_transform = '16:31'\npipeline_stages = 2\n"
        "[[datasets]]\ndataset_path = 'a.jsonl'\ncontrol_class = 1\n"
    )
    expected = import_qlora_pipe_config(toml_path)

    stdout = run_script(toml_path)
    assert stdout.returncode == 0, stdout.stderr
    assert stdout.stdout.startswith(f"# Converted from the qlora-pipe-lite config {toml_path.resolve()}\n")
    assert yaml.safe_load(stdout.stdout) == expected

    out = tmp_path / "config.yaml"
    written = run_script(toml_path, "-o", out)
    assert written.returncode == 0, written.stderr
    assert out.read_text() == stdout.stdout and "'16:31'" in out.read_text()  # quoted: YAML 1.1 reads 16:31 as 991

    again = run_script(toml_path, "-o", out)  # never overwrites
    assert again.returncode != 0 and "exists" in again.stderr
    assert out.read_text() == stdout.stdout

    toml_path.write_text("model_dir = '/m'\nlora_alpha = 16\n[[datasets]]\ndataset_path = 'a'\n")
    bad = run_script(toml_path, "-o", tmp_path / "bad.yaml")
    assert bad.returncode != 0 and "'lora_alpha'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()


def test_script_docstring_shows_usage():
    assert "python tools/import_qlora_pipe_config.py config.toml [-o config.yaml]" in SCRIPT.read_text()


def test_all_linear_targets_mixtrals_fused_experts(tiny_model):
    """qlora-pipe-lite's all-linear covered Mixtral's expert linears (transformers 4.x); the imported config
    targets the fused expert tensors of transformers 5.x."""
    import torch

    from lit_qlp.adapters.experts import expert_loras
    from lit_qlp.methods import LoRA
    from lit_qlp.models.pipeline import ModelSource
    from tests.tiny_models import stage_layers

    converted = import_qlora_pipe_config(
        "model_dir = '/m'\ntarget_modules = 'all-linear'\nlora_rank = 4\n[[datasets]]\ndataset_path = 'd.jsonl'\n"
    )
    method = LoRA(**converted["model"]["method"]["init_args"])
    source = ModelSource(tiny_model("mixtral"), dtype="float32")
    assert method.expert_targets(source) == ["experts.gate_up_proj", "experts.down_proj"]
    layers = stage_layers(source, method.layer_adapter(source, seed=0))
    adapted = {(name, tensor) for layer in layers for name, tensor, _ in expert_loras(layer)}
    assert adapted == {("layer.mlp.experts", t) for t in ("gate_up_proj", "down_proj")}
    assert all(
        p.dtype == torch.float32 for layer in layers for _, _, lora in expert_loras(layer) for p in lora.parameters()
    )
