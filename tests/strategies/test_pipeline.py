"""End-to-end training through the real CLI: pipeline vs one process, exact resume, the epoch adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import ROOT, TWO_STAGES, assert_same_losses, fit_args, run_cli, scalars
from tests.tiny_models import VOCAB

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(tiny_model, corpus, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of 8 steps, checkpointing every 3."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(
        fit_args(tiny_model("llama"), corpus, root, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3"), ROOT
    )
    return root


def test_loss_falls_and_eval_is_logged(reference_run):
    losses = scalars(reference_run, "train/loss")
    assert len(losses) == 8
    steps = sorted(losses)
    assert losses[steps[-1]] < losses[steps[0]]
    evaluations = scalars(reference_run, "eval/loss")
    assert 0 in evaluations and len(evaluations) > 1  # the initial evaluation, then the periodic ones
    from lit_qlp.callbacks.schedule import rms_ratio

    for tag in ("train/norms_avg", "train/norms_min", "train/norms_max", "train/tokens_per_s", "train/sequences_per_s"):
        assert sorted(scalars(reference_run, tag)) == steps, tag
    lrs = scalars(reference_run, "train/lr")
    assert sorted(lrs) == steps
    for step, lr in lrs.items():  # --model.lr=1e-2, beta2 0.99: the RMS-ratio schedule, t = step + 1
        assert lr == pytest.approx(1e-2 * rms_ratio(0.99, step + 1), rel=1e-6)


def test_two_stages_in_two_processes_give_the_same_losses(tiny_model, corpus, reference_run, tmp_path):
    run_cli(
        fit_args(
            tiny_model("llama"),
            corpus,
            tmp_path,
            "--trainer.max_steps=4",
            "--trainer.devices=2",
            "--trainer.strategy.pipeline_stages=2",
        ),
        ROOT,
    )
    reference = scalars(reference_run, "train/loss")
    losses = scalars(tmp_path, "train/loss")
    assert len(losses) == 4
    for step, loss in losses.items():
        torch.testing.assert_close(loss, reference[step], msg=lambda m: f"step {step}: {m}")
    # ‖BA‖_F statistics gathered from both stages equal those of the one-process run.
    for tag in ("train/norms_avg", "train/norms_min", "train/norms_max"):
        expected, got = scalars(reference_run, tag), scalars(tmp_path, tag)
        assert sorted(got) == list(range(4)) and got[3] > 0, tag
        for step in got:
            torch.testing.assert_close(got[step], expected[step], rtol=1e-5, atol=1e-7, msg=lambda m: f"{tag} {m}")


def test_resume_from_checkpoint_continues_exactly(tiny_model, corpus, reference_run, tmp_path):
    model_dir = tiny_model("llama")
    run_cli(fit_args(model_dir, corpus, tmp_path, "--trainer.max_steps=3", "--checkpoint.every_n_train_steps=3"), ROOT)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    run_cli(
        fit_args(model_dir, corpus, tmp_path, "--trainer.max_steps=8", "--ckpt_path=last"),
        ROOT,
    )
    reference = scalars(reference_run, "train/loss")
    resumed = scalars(tmp_path, "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step in sorted(reference):
        assert resumed[step] == reference[step], f"step {step}: resumed {resumed[step]} != {reference[step]}"


def test_epoch_adapter_loads_in_peft_with_the_trained_logits(tiny_model, corpus, tmp_path):
    peft = pytest.importorskip("peft")
    from lit_qlp.adapters.lora import LoraAdapter, LoraLinear
    from lit_qlp.models.pipeline import ModelSource
    from tests.tiny_models import load_hf, stage_layers

    model_dir = tiny_model("llama")
    run_cli(fit_args(model_dir, corpus, tmp_path, "--trainer.max_epochs=1", "--checkpoint.every_n_train_steps=0"), ROOT)
    adapter_dir = tmp_path / "epoch1"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()

    # lit_qlp's forward with the weights of the final training checkpoint (written by the engine, not the export).
    source = ModelSource(model_dir, dtype="float32")
    n = source.quirks.num_layers
    adapter = LoraAdapter(4, 4, 0.0, "all-linear", range(n), torch.float32, seed=0)
    layers = stage_layers(source, adapter)
    (step_dir,) = (tmp_path / "checkpoints" / "last.ckpt").resolve().glob("global_step*")
    for index, layer in enumerate(layers):
        state = torch.load(step_dir / f"layer_{index:02d}-model_states.pt", weights_only=False)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        assert not unexpected
        assert all("lora_" not in k for k in missing)
    assert any(isinstance(m, LoraLinear) and m.lora_B.weight.abs().sum() > 0 for m in layers[1].modules())

    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    x = (ids, torch.arange(32).unsqueeze(0), torch.zeros_like(ids))
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        x = layers[-1].logits(x)
        model = peft.PeftModel.from_pretrained(load_hf(model_dir, "sdpa"), adapter_dir).eval()
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(x, reference)


def test_torchrun_launch(tiny_model, corpus, reference_run, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m")
    run_cli(fit_args(tiny_model("llama"), corpus, tmp_path, *TWO_STAGES), ROOT, launcher)
    assert_same_losses(tmp_path, scalars(reference_run, "train/loss"), 4)


def test_deepspeed_launcher(tiny_model, corpus, reference_run, tmp_path):
    launcher = (sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2", "--no_local_rank", "--module")
    run_cli(fit_args(tiny_model("llama"), corpus, tmp_path, *TWO_STAGES), ROOT, launcher)
    assert_same_losses(tmp_path, scalars(reference_run, "train/loss"), 4)


@pytest.fixture(scope="module")
def four_sequence_reference(tiny_model, corpus, tmp_path_factory) -> dict[int, float]:
    """One process, 4 sequences per step: the same sequences per step as 2 replicas × 2 micro-batches."""
    root = tmp_path_factory.mktemp("reference4")
    run_cli(
        fit_args(tiny_model("llama"), corpus, root, "--trainer.max_steps=4")
        + ["--trainer.strategy.gradient_accumulation_steps=4"],
        ROOT,
    )
    return scalars(root, "train/loss")


FOUR_PROCESSES = ("--trainer.max_steps=4", "--trainer.strategy.pipeline_stages=2")


@pytest.mark.parametrize("column_major", [True, False], ids=["column_major", "row_major"])
def test_two_stages_times_two_replicas(tiny_model, corpus, four_sequence_reference, tmp_path, column_major):
    run_cli(
        fit_args(tiny_model("llama"), corpus, tmp_path, *FOUR_PROCESSES, "--trainer.devices=4")
        + [f"--trainer.strategy.use_column_major_topology={str(column_major).lower()}"],
        ROOT,
    )
    assert_same_losses(tmp_path, four_sequence_reference, 4)


def run_two_simulated_nodes(tiny_model, corpus, four_sequence_reference, tmp_path, launcher) -> None:
    """2 nodes × 2 processes on one machine: ``launcher(node_rank, port)`` is the command line starting one node.

    Checks that every node exits cleanly, that the launcher's global ranks were used (node 0 runs ranks 0-1, stage
    0 of both replicas; node 1 ranks 2-3, stage 1) and that the losses are the one-process losses.
    """
    args = fit_args(tiny_model("llama"), corpus, tmp_path, *FOUR_PROCESSES, "--trainer.devices=2")
    args.append("--trainer.num_nodes=2")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    port = str(28000 + os.getpid() % 2000)
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", *launcher(rank, port), "lit_qlp", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    assert "ProcessCoord(pipe=1, data=1): 3" in outputs[0]
    assert_same_losses(tmp_path, four_sequence_reference, 4)


def test_simulated_two_nodes_under_torchrun(tiny_model, corpus, four_sequence_reference, tmp_path):
    """Each node started by its own torchrun, as on a cluster."""

    def torchrun(rank: int, port: str) -> list[str]:
        return ["torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=2"] + [
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
        ]

    run_two_simulated_nodes(tiny_model, corpus, four_sequence_reference, tmp_path, torchrun)


def test_simulated_two_nodes_under_the_deepspeed_launcher(tiny_model, corpus, four_sequence_reference, tmp_path):
    """Each node started as DeepSpeed's runner starts it over ssh."""
    import base64

    world = base64.urlsafe_b64encode(json.dumps({"node0": [0, 1], "node1": [0, 1]}).encode()).decode()

    def deepspeed_launch(rank: int, port: str) -> list[str]:
        return ["deepspeed.launcher.launch", f"--world_info={world}", f"--node_rank={rank}"] + [
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--no_local_rank",
            "--module",
        ]

    run_two_simulated_nodes(tiny_model, corpus, four_sequence_reference, tmp_path, deepspeed_launch)


def trained_rows(root: Path) -> dict[int, list[str]]:
    """Sequence hashes trained per epoch, over all ranks, from tests.recording.RecordBatches (last record per step)."""
    per_step: dict[tuple[int, int], list[str]] = {}
    for path in root.glob("batches.rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_step[(path.name, record["step"])] = (record["epoch"], record["rows"])
    epochs: dict[int, list[str]] = {}
    for epoch, rows in per_step.values():
        epochs.setdefault(epoch, []).extend(rows)
    return epochs


def test_data_parallel_resume_mid_epoch_is_exact_and_sees_every_sequence_once(tiny_model, corpus, tmp_path):
    """2 data-parallel processes; stopped in the second epoch and resumed: same losses, each sequence once."""
    model_dir = tiny_model("llama")
    common = ["--trainer.devices=2", "--trainer.callbacks+=tests.recording.RecordBatches"]
    full = tmp_path / "full"
    run_cli(fit_args(model_dir, corpus, full, "--trainer.max_epochs=2", *common), ROOT)
    reference = scalars(full, "train/loss")
    steps_per_epoch = len(reference) // 2
    stop = steps_per_epoch + 2

    resumed = tmp_path / "resumed"
    run_cli(
        fit_args(model_dir, corpus, resumed, f"--trainer.max_steps={stop}", "--trainer.max_epochs=2", *common)
        + [f"--checkpoint.every_n_train_steps={stop}"],
        ROOT,
    )
    run_cli(fit_args(model_dir, corpus, resumed, "--trainer.max_epochs=2", "--ckpt_path=last", *common), ROOT)
    losses = scalars(resumed, "train/loss")
    assert sorted(losses) == sorted(reference)
    for step in sorted(reference):
        assert losses[step] == reference[step], f"step {step}: resumed {losses[step]} != {reference[step]}"

    full_rows, resumed_rows = trained_rows(full), trained_rows(resumed)
    assert sorted(full_rows) == [0, 1]
    for epoch, rows in full_rows.items():
        # Every global batch is complete and no sequence repeats within an epoch, across both replicas.
        assert len(rows) == len(set(rows)) == steps_per_epoch * 2 * 2, f"epoch {epoch}"
        assert sorted(resumed_rows[epoch]) == sorted(rows), f"epoch {epoch}: the resumed run saw other sequences"


def test_lora_weight_decay_shrinks_ba_and_is_reported(tiny_model, corpus, reference_run, tmp_path):
    run_cli(
        fit_args(tiny_model("llama"), corpus, tmp_path, "--trainer.max_steps=4", "--model.method.weight_decay=5"), ROOT
    )
    decay = scalars(tmp_path, "train/weight_decay_avg")
    assert sorted(decay) == list(range(4)) and all(d > 0 for d in decay.values())  # the decay follows each step
    for tag in ("train/weight_decay_min", "train/weight_decay_max"):
        assert sorted(scalars(tmp_path, tag)) == list(range(4)), tag
    # The decayed adapters end smaller than the undecayed reference run's.
    assert scalars(tmp_path, "train/norms_avg")[3] < scalars(reference_run, "train/norms_avg")[3]


def test_a_run_killed_mid_training_resumes_with_the_uninterrupted_losses(tiny_model, corpus, reference_run, tmp_path):
    """SIGKILL at step 5 (the last checkpoint is step 3's); --ckpt_path last then gives the reference's losses."""
    model_dir = tiny_model("llama")
    args = fit_args(model_dir, corpus, tmp_path, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3")
    killer = "--trainer.callbacks+={class_path: tests.recording.KillAtStep, init_args: {step: 5}}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    killed = subprocess.run([sys.executable, "-m", "lit_qlp", *args, killer], cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=3.ckpt"
    run_cli([*args, "--ckpt_path=last"], ROOT)
    reference = scalars(reference_run, "train/loss")
    resumed = scalars(tmp_path, "train/loss")  # steps 3-4 logged twice: the resumed run's values are read last
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == reference[step], f"step {step}: resumed {resumed[step]} != {reference[step]}"


def interrupted_run(args: list[str], step: int, signal_name: str = "SIGTERM", rank: int | None = None) -> str:
    """Runs the CLI with ``signal_name`` sent after optimizer step ``step`` (on ``rank`` only, if given); checks that
    it exited with 128 + the signal's number and returns what it printed."""
    options = f"step: {step}, signal: {signal_name}" + ("" if rank is None else f", rank: {rank}")
    sender = f"--trainer.callbacks+={{class_path: tests.recording.SignalAtStep, init_args: {{{options}}}}}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lit_qlp", *args, sender]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 128 + getattr(signal, signal_name), result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_same_losses_exactly(root: Path, reference: dict[int, float]) -> None:
    losses = scalars(root, "train/loss")  # steps logged twice: the resumed run's values are read last
    assert sorted(losses) == sorted(reference)
    for step in reference:
        assert losses[step] == reference[step], f"step {step}: resumed {losses[step]} != {reference[step]}"


def test_sigterm_saves_its_step_and_the_resumed_run_gives_the_uninterrupted_losses(
    tiny_model, corpus, reference_run, tmp_path
):
    """SIGTERM after step 5 (the last scheduled checkpoint is step 3's): the run saves step 5, writes no export and
    exits with 143; --ckpt_path last then gives the reference's losses."""
    args = fit_args(
        tiny_model("llama"), corpus, tmp_path, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3"
    )
    output = interrupted_run(args, 5)
    checkpoints = tmp_path / "checkpoints"
    saved = checkpoints / "epoch=0-step=5.ckpt"
    assert f"SIGTERM received at step 5: saved {saved}; resume with --ckpt_path last" in output
    assert (checkpoints / "last.ckpt").resolve() == saved and (saved / "latest").read_text() == "global_step5"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("step", "epoch"))]
    run_cli([*args, "--ckpt_path=last"], ROOT)
    assert_same_losses_exactly(tmp_path, scalars(reference_run, "train/loss"))
    assert (tmp_path / "step8" / "adapter_model.safetensors").is_file()  # the resumed run exports


def test_ctrl_c_saves_the_step_with_the_methods_post_step_update(tiny_model, corpus, tmp_path):
    """Ctrl-C after step 2 with composite weight decay, which changes the weights after each optimizer step: the
    checkpoint holds the decayed weights (exit status 130), so the resumed run repeats the uninterrupted losses."""

    def args(root: Path) -> list[str]:
        return fit_args(tiny_model("llama"), corpus, root, "--trainer.max_steps=4", "--model.method.weight_decay=1.0")

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(args(straight), ROOT)
    output = interrupted_run(args(stopped), 2, "SIGINT")
    assert "SIGINT received at step 2: saved" in output
    assert (stopped / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=2.ckpt"
    run_cli([*args(stopped), "--ckpt_path=last"], ROOT)
    assert_same_losses_exactly(stopped, scalars(straight, "train/loss"))


def test_a_signal_after_the_last_step_lets_the_run_write_its_export(tiny_model, corpus, tmp_path):
    """SIGTERM after the last step (max_steps): the epoch ends first, so the run writes its step4/ export, which a
    resumed run, with nothing left to train, would not; then it saves and exits with 143."""
    output = interrupted_run(fit_args(tiny_model("llama"), corpus, tmp_path, "--trainer.max_steps=4"), 4)
    assert "SIGTERM received at step 4: saved" in output
    assert (tmp_path / "step4" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=4.ckpt"


def test_sigterm_to_one_of_two_processes_stops_both_at_its_step(tiny_model, corpus, reference_run, tmp_path):
    """SIGTERM to rank 1 only (``kill`` of one pid): both stages agree, save step 2 and stop; the resume (also two
    processes) gives the one-process losses."""
    args = fit_args(tiny_model("llama"), corpus, tmp_path, *TWO_STAGES)
    output = interrupted_run(args, 2, rank=1)
    assert "SIGTERM received at step 2: saved" in output
    step_dir = tmp_path / "checkpoints" / "last.ckpt" / "global_step2"
    assert {p.name for p in step_dir.glob("mp_rank_*")} == {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"}
    run_cli([*args, "--ckpt_path=last"], ROOT)
    assert_same_losses(tmp_path, scalars(reference_run, "train/loss"), 4)


def test_raising_the_epoch_count_after_a_finished_run_continues_it(tiny_model, corpus, tmp_path):
    model_dir = tiny_model("llama")
    straight = tmp_path / "straight"
    run_cli(fit_args(model_dir, corpus, straight, "--trainer.max_epochs=2", "--checkpoint.every_n_train_steps=0"), ROOT)
    extended = tmp_path / "extended"
    run_cli(fit_args(model_dir, corpus, extended, "--trainer.max_epochs=1", "--checkpoint.every_n_train_steps=0"), ROOT)
    assert (extended / "epoch1").is_dir()
    run_cli(
        fit_args(model_dir, corpus, extended, "--trainer.max_epochs=2", "--checkpoint.every_n_train_steps=0")
        + ["--ckpt_path=last"],
        ROOT,
    )
    assert (extended / "epoch2").is_dir()
    reference, losses = scalars(straight, "train/loss"), scalars(extended, "train/loss")
    assert sorted(losses) == sorted(reference)
    for step in reference:
        assert losses[step] == reference[step], f"step {step}: extended {losses[step]} != {reference[step]}"
    lrs, reference_lrs = scalars(extended, "train/lr"), scalars(straight, "train/lr")
    assert all(lrs[s] == reference_lrs[s] for s in reference_lrs)  # the schedule continued, not restarted


def test_converted_checkpoint_equals_the_export_bit_for_bit(reference_run, tmp_path):
    from lit_qlp.export.checkpoint import convert_ds_checkpoint

    # The reference run stopped at step 8 (max_steps): it exported step8/ and saved the checkpoint there.
    assert (reference_run / "checkpoints" / "last.ckpt").resolve().name == "epoch=0-step=8.ckpt"
    convert_ds_checkpoint(reference_run / "checkpoints" / "last.ckpt", reference_run / "config.yaml", tmp_path / "out")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (reference_run / "step8" / name).read_bytes(), name
    # The same from the command line.
    script = [
        sys.executable,
        ROOT / "tools" / "convert_ds_checkpoint.py",
        "--input",
        reference_run / "checkpoints" / "last.ckpt",
    ]
    command = [*script, "--config", reference_run / "config.yaml", "--output", tmp_path / "cli"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    name = "adapter_model.safetensors"
    assert (tmp_path / "cli" / name).read_bytes() == (reference_run / "step8" / name).read_bytes()
