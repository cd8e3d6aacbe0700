"""The real ``lit-qlp`` CLI: every shipped config parses, unknown keys are refused, bad inputs fail early and cleanly.

Everything runs in-process through ``lit_qlp.cli.main`` (``python -m lit_qlp`` runs the same function; the training
tests run it as a subprocess). Nothing here trains.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from lit_qlp.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("clean_process_state")  # tests/conftest.py: the CLI runs in this process
CONFIGS = sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/*.yml")])


class WroteIntoRootDir(AssertionError):
    """A failed run left files in trainer.default_root_dir (kept apart from wrong messages for the xfails)."""


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    """The tiny llama and a jsonl corpus of a few hundred documents of "w.." words."""
    directory = tmp_path_factory.mktemp("cli_data")
    rng = random.Random(0)
    corpus = directory / "train.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for _ in range(300):
            words = " ".join(f"w{rng.randrange(92)}" for _ in range(rng.randint(5, 40)))
            f.write(json.dumps({"text": words}) + "\n")
    return {"model_dir": Path(tiny_model("llama")), "corpus": corpus}


def run(args: list[str]) -> int:
    """Runs the CLI; the exit code (0 when it returns normally). Other exceptions propagate."""
    try:
        main(args)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return 0


def demo_like_config(assets, root: Path) -> dict:
    """``configs/demo.yaml``'s settings, pointed at the tiny model and corpus."""
    return {
        "seed_everything": 42,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "default_root_dir": str(root),
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "strategy": {
                "class_path": "lit_qlp.strategies.PipelineStrategy",
                "init_args": {
                    "pipeline_stages": 1,
                    "gradient_accumulation_steps": 2,
                    "gradient_clipping": 1.0,
                    "partition_method": "parameters",
                },
            },
        },
        "model": {
            "model_dir": str(assets["model_dir"]),
            "dtype": "float32",
            "method": {
                "class_path": "lit_qlp.methods.LoRA",
                "init_args": {"rank": 4, "target_modules": "all-linear"},
            },
            "lr": 2.0e-3,
        },
        "data": {"datasets": [{"dataset_path": str(assets["corpus"])}], "sequence_len": 64, "eval_fraction": 0.05},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def leaves(tree, prefix=()):
    """``{(key, path, ...): value}`` of the scalar leaves of nested dicts (lists count as leaves)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(leaves(value, (*prefix, key)))
        return out
    return {prefix: tree}


# ----------------------------------------------------------------------------------------------------- configs


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the configs' relative paths are relative to the repository root
    content = yaml.safe_load(config.read_text(encoding="utf-8"))
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "root")]
    overridden = {("trainer", "default_root_dir")}
    model_dir = Path(content.get("model", {}).get("model_dir", ""))
    if not (model_dir / "config.json").is_file():  # a real-model recipe: parse it against the tiny model
        args += ["--model.model_dir", str(assets["model_dir"])]
        args += ["--data.datasets", json.dumps([{"dataset_path": str(assets["corpus"])}])]
        overridden |= {("model", "model_dir"), ("data", "datasets")}
    code = run([*args, "--print_config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    printed = yaml.safe_load(captured.out)
    # Every value the file sets survives into the parsed configuration.
    parsed = leaves(printed)
    for key, value in leaves(content).items():
        if key[:2] in overridden or key[:2] in {("trainer", "callbacks"), ("trainer", "logger")}:
            continue
        assert key in parsed, f"{config.name}: {'.'.join(map(str, key))} is missing from the parsed config"
        got = parsed[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # Lists of dataclasses print with their defaults filled in: compare the keys the file sets.
            got = [{k: g[k] for k in v} for g, v in zip(got, value)]
        assert got == value, f"{config.name}: {'.'.join(map(str, key))}"
    assert not (tmp_path / "root").exists(), "--print_config wrote into default_root_dir"


def test_print_config_of_demo_like_config(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, tmp_path / "root"))
    extra = ["--trainer.strategy.pipeline_stages", "2", "--model.method.layers_to_transform", "1:3"]
    assert run(["fit", "--config", str(config), *extra, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lit_qlp.strategies.PipelineStrategy"
    assert strategy["init_args"]["pipeline_stages"] == 2
    assert strategy["init_args"]["gradient_accumulation_steps"] == 2
    assert printed["model"]["method"]["init_args"]["layers_to_transform"] == "1:3"  # text, not a number
    assert printed["checkpoint"]["max_checkpoints"] == 3 and printed["export"]["dirname"] == "epoch{epoch}"
    assert list(tmp_path.iterdir()) == [config]


def test_yaml_layer_range_quoting(assets, tmp_path, monkeypatch, capsys):
    """A quoted range in a YAML file stays text; an unquoted ``1:3`` (YAML 1.1 reads it as 63) is refused."""
    monkeypatch.chdir(tmp_path)
    content = demo_like_config(assets, tmp_path / "root")
    content["model"]["method"]["init_args"]["layers_to_transform"] = "1:3"
    config = write_config(tmp_path / "quoted.yaml", content)
    assert "'1:3'" in config.read_text()
    assert run(["fit", "--config", str(config), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["method"]["init_args"]["layers_to_transform"] == "1:3"
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text(config.read_text().replace("'1:3'", "1:3"))
    assert run(["fit", "--config", str(unquoted), "--print_config"]) != 0
    assert "layers_to_transform" in capsys.readouterr().err


@pytest.mark.parametrize(
    "where, text, number",
    [
        (("model", "method", "init_args", "layers_to_transform"), "1:3", 63),
        (("trainer", "max_time"), "1:00:00:00", 216000),
    ],
)
def test_yaml_base60_number_asks_for_quotes(where, text, number, assets, tmp_path, monkeypatch, capsys):
    """YAML 1.1 reads an unquoted ``1:3`` as the base-60 number 63: the error names the file, line and key and shows
    the quoted form."""
    monkeypatch.chdir(tmp_path)
    content = demo_like_config(assets, tmp_path / "root")
    section = content
    for key in where[:-1]:
        section = section[key]
    section[where[-1]] = "PLACEHOLDER"
    config = tmp_path / "unquoted.yaml"
    config.write_text(yaml.safe_dump(content, sort_keys=False).replace("PLACEHOLDER", text), encoding="utf-8")
    line = next(n for n, t in enumerate(config.read_text().splitlines(), 1) if text in t)
    assert run(["fit", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert f"unquoted.yaml, line {line}: YAML reads `{where[-1]}: {text}` as the base-60 number {number}" in err
    assert f"quote it: {where[-1]}: '{text}'" in err
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    "text, place",
    [
        ("trainer:\n  max_epochs: 1\n  devices: [1\nmodel:\n  lr: 1\n", "line 4, column 6"),
        ("trainer:\n  max_epochs: 1\n    devices: 1\n", "line 3, column 12"),
        ('model:\n  model_dir: "unterminated\n', "line 3, column 1"),
    ],
)
def test_invalid_yaml_names_its_file(text, place, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "broken.yaml"
    config.write_text(text, encoding="utf-8")
    assert run(["fit", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert f"broken.yaml, {place}: invalid YAML" in err and "fix the file's syntax" in err


def test_help_says_how_to_show_the_strategy_options(capsys):
    assert run(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the help is wrapped at the terminal width
    assert "--trainer.strategy.help PipelineStrategy (pipeline_stages, gradient_accumulation_steps," in out
    assert "--model.method.help LoRA (or ControlAdapters, FullFineTuning)" in out
    assert "--model.base.help BitsAndBytes4bit" in out
    assert run(["fit", "--trainer.strategy.help", "PipelineStrategy"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.strategy.pipeline_stages" in out and "--trainer.strategy.gradient_accumulation_steps" in out


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--trainer.max_epoch", "2"], "--trainer.max_epoch"),
        (["--data.sequence", "128"], "--data.sequence"),
        (["--trainer.default_root", "elsewhere"], "--trainer.default_root"),
    ],
)
def test_abbreviated_options_are_refused(extra, name, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, tmp_path / "root"))
    assert run(["fit", "--config", str(config), *extra, "--print_config"]) != 0
    assert f"unrecognized arguments: {name}" in capsys.readouterr().err
    assert run(["fit", "--conf", str(config), "--print_config"]) != 0  # LightningCLI's own --config, too
    assert "unrecognized arguments: --conf" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_default_strategy_is_pipeline(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--model.model_dir", str(assets["model_dir"])]
    args += ["--data.datasets", json.dumps([{"dataset_path": str(assets["corpus"])}])]
    assert run([*args, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["class_path"] == "lit_qlp.strategies.PipelineStrategy"


@pytest.mark.parametrize(
    "extra, method, base",
    [
        ([], "LoRA", None),
        (["--model.base", "lit_qlp.bases.BitsAndBytes4bit"], "LoRA", "BitsAndBytes4bit"),
        (["--model.method", "lit_qlp.methods.ControlAdapters"], "ControlAdapters", None),
        (
            ["--model.method", "lit_qlp.methods.ControlAdapters", "--model.base", "lit_qlp.bases.BitsAndBytes4bit"],
            "ControlAdapters",
            "BitsAndBytes4bit",
        ),
        (["--model.method", "lit_qlp.methods.FullFineTuning"], "FullFineTuning", None),
    ],
)
def test_print_config_shows_only_the_options_of_the_chosen_method_and_base(
    extra, method, base, assets, tmp_path, monkeypatch, capsys
):
    import inspect

    import lit_qlp.bases
    import lit_qlp.methods

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, tmp_path / "root"))
    assert run(["fit", "--config", str(config), *extra, "--print_config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["method"]["class_path"] == f"lit_qlp.methods.{method}"
    expected = set(inspect.signature(getattr(lit_qlp.methods, method)).parameters)
    assert set(model["method"]["init_args"]) == expected
    if base is None:
        assert model["base"] is None
    else:
        assert model["base"]["class_path"] == f"lit_qlp.bases.{base}"
        assert set(model["base"]["init_args"]) == set(inspect.signature(getattr(lit_qlp.bases, base)).parameters)
    method_keys = {"rank", "dropout", "target_modules", "weight_decay", "gamma", "quant_type", "double_quant"}
    assert not method_keys & set(model), "an option of a method or base at the top of model"


# ----------------------------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--model.nonexistent", "1"], "nonexistent"),
        (["--model.method.gamma", "0.3"], "gamma"),  # a Control Adapter option, and the method is LoRA
        (["--model.lora_rank", "4"], "lora_rank"),  # the options of the methods live on the methods
        (["--data.sequence_length", "128"], "sequence_length"),
        (["--trainer.strategy.pipeline_stage", "2"], "pipeline_stage"),
        (["--trainer.gradient_clip", "1.0"], "gradient_clip"),
        (["--model.sdpa_backends", "[fast]"], "sdpa_backends"),  # a value torch has no kernel of
    ],
)
def test_unknown_command_line_keys_rejected(extra, name, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, tmp_path / "root"))
    code = run(["fit", "--config", str(config), *extra])
    assert code != 0
    assert name in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    "where, name",
    [
        (("model",), "nonexistent"),
        (("model", "method", "init_args"), "quant_type"),
        (("data",), "shuffle"),
        (("trainer", "strategy", "init_args"), "stages"),
        ((), "mdl"),
    ],
)
def test_unknown_yaml_keys_rejected(where, name, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    content = demo_like_config(assets, tmp_path / "root")
    section = content
    for key in where:
        section = section.setdefault(key, {})
    section[name] = 1
    config = write_config(tmp_path / "c.yaml", content)
    code = run(["fit", "--config", str(config), "--print_config"])
    assert code != 0
    assert name in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


# ----------------------------------------------------------------------------------------------------- bad inputs


def bad_input_cases():
    # EMPTY_DIR: a directory without config.json; NO_FILES: a pattern matching no file (filled in by the test).
    return [
        pytest.param(
            ["--data.sequence_len", "100"],
            ValueError,
            ["data.sequence_len=100", "multiple of 64", "128"],
            id="sequence_len",
        ),
        pytest.param(
            ["--data.sequence_len", "0"],
            ValueError,
            ["data.sequence_len=0", "must be positive", "multiple of 64"],
            id="sequence_len_zero",
        ),
        pytest.param(
            ["--model.model_dir", "EMPTY_DIR"],
            FileNotFoundError,
            ["model.model_dir=", "EMPTY_DIR", "config.json"],
            id="model_dir",
        ),
        pytest.param(
            ["--model.method.layers_to_transform", "0:9"],
            ValueError,
            ["model.method.layers_to_transform='0:9'", "layer 9", "4 layers"],
            id="layers_to_transform",
        ),
        pytest.param(
            ["--model.method.target_modules", '["q_proj", "foo_proj"]'],
            ValueError,
            ["target_modules", "['foo_proj']", "q_proj"],
            id="target_modules",
        ),
        pytest.param(
            ["--data.datasets", json.dumps([{"dataset_path": "NO_FILES"}])],
            FileNotFoundError,
            ["data.datasets", "NO_FILES", "matches no file"],
            id="dataset_path",
        ),
        pytest.param(["--model.method.rank", "0"], ValueError, ["model.method.rank=0"], id="rank"),
        pytest.param(
            ["--model.method", "lit_qlp.methods.ControlAdapters", "--model.method.gamma", "0.7"],
            ValueError,
            ["model.method.gamma=0.7", "(0, 0.5]"],
            id="control_gamma",
        ),
        pytest.param(
            ["--model.method", "lit_qlp.methods.FullFineTuning", "--model.base", "lit_qlp.bases.BitsAndBytes4bit"],
            ValueError,
            ["FullFineTuning", "remove model.base"],
            id="full_on_4bit",
        ),
        pytest.param(
            ["--trainer.strategy.partition_method", "foo"],
            ValueError,
            ["partition_method='foo'", "type:REGEX"],
            id="partition_method",
        ),
        pytest.param(
            ["--trainer.strategy.partition_method", "type:["],
            ValueError,
            ["partition_method='type:['", "regular expression"],
            id="partition_regex",
        ),
        pytest.param(
            ["--trainer.strategy.pipeline_stages", "3"],
            ValueError,
            ["pipeline_stages=3", "must divide", "(1)"],
            id="pipeline_stages",
        ),
        pytest.param(
            ["--trainer.accumulate_grad_batches", "2"],
            ValueError,
            ["trainer.accumulate_grad_batches=2", "trainer.strategy.gradient_accumulation_steps"],
            id="accumulate_grad_batches",
        ),
        pytest.param(
            ["--ckpt_path", "last"],
            FileNotFoundError,
            ["--ckpt_path last", "ROOT_DIR/checkpoints", "leave out --ckpt_path"],
            id="ckpt_path_last_without_checkpoint",
        ),
        pytest.param(
            ["--trainer.gradient_clip_val", "1.0"],
            ValueError,
            ["trainer.gradient_clip_val=1.0", "trainer.strategy.gradient_clipping"],
            id="gradient_clip_val",
        ),
    ]


@pytest.mark.parametrize("extra, error, fragments", bad_input_cases())
def test_bad_input_fails_early_and_writes_nothing(extra, error, fragments, assets, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    placeholders = {"ROOT_DIR": str(root), "EMPTY_DIR": str(empty), "NO_FILES": str(tmp_path / "no-such-*.jsonl")}

    def fill(text: str) -> str:
        for placeholder, value in placeholders.items():
            text = text.replace(placeholder, value)
        return text

    extra = [fill(a) for a in extra]
    fragments = [fill(f) for f in fragments]
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, root))
    with pytest.raises(error) as info:
        main(["fit", "--config", str(config), *extra])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the error:\n{message}"
    assert not any(cwd.iterdir()), f"the run wrote into the working directory: {sorted(os.listdir(cwd))}"
    if root.exists() and any(root.iterdir()):
        raise WroteIntoRootDir(f"the failed run wrote into default_root_dir: {sorted(os.listdir(root))}")


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("latin1.txt", "caf\xe9 w1 w2".encode("latin-1"), ["latin1.txt, line 1: not UTF-8 text", "convert the file"]),
        (
            "chat.jsonl",
            json.dumps({"messages": [{"role": "user", "content": "w1"}, {"role": "wizard", "content": "w2"}]}).encode(),
            ["chat.jsonl, line 1: turn 1 has unknown role 'wizard'", "'system', 'user', 'assistant'"],
        ),
        (
            "object.json",
            json.dumps({"data": [{"text": "w1"}]}).encode(),
            ["object.json: a .json dataset must hold a list of records", "its key 'data' holds a list"],
        ),
    ],
)
def test_unreadable_dataset_fails_before_the_run_writes(name, content, fragments, assets, tmp_path, monkeypatch):
    """Datasets are read when the cache is built, in ``prepare_data``: before the logger or any callback writes into
    default_root_dir."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    dataset = tmp_path / name
    dataset.write_bytes(content)
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, root))
    args = ["fit", "--config", str(config), "--data.datasets", json.dumps([{"dataset_path": str(dataset)}])]
    with pytest.raises(ValueError) as info:
        main([*args, "--data.cache_dir", str(tmp_path / "cache")])
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in the error:\n{info.value}"
    written = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert not written, f"the failed run wrote into default_root_dir: {written}"


def test_validate_last_without_checkpoint_fails_and_writes_nothing(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    config = write_config(tmp_path / "c.yaml", demo_like_config(assets, root))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*root/checkpoints"):
        main(["validate", "--config", str(config), "--ckpt_path", "last"])
    assert not root.exists() or not any(root.iterdir()), sorted(os.listdir(root))


class FakeClock:
    """``time.monotonic`` that advances ``step`` seconds at every call."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_time_based_checkpoints_and_retention(tiny_model, corpus, tmp_path, monkeypatch):
    """A clock that advances 0.4 h per check: saves at steps 3, 6 and 9, the newest two kept, last -> 9."""
    from lightning.pytorch.callbacks import model_checkpoint

    from tests.runs import ROOT, fit_args

    monkeypatch.setattr(model_checkpoint, "time", FakeClock(0.4 * 3600))
    args = fit_args(
        tiny_model("llama"), corpus, tmp_path, "--trainer.max_steps=9", "--trainer.enable_progress_bar=false"
    )
    args += ["--checkpoint.every_n_train_steps=0", "--checkpoint.checkpoint_interval_hours=1"]
    args += ["--checkpoint.max_checkpoints=2", "--checkpoint.save_on_epoch_end=false"]
    monkeypatch.chdir(ROOT)
    assert run(args) == 0
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=6.ckpt", "epoch=0-step=9.ckpt", "last.ckpt"]
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=9.ckpt"
