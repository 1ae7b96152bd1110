"""MoETrainerCallback on real Hugging Face Trainer / TRL SFTTrainer runs of tiny random Mixtral and Qwen3-MoE."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback  # noqa: E402

from moe_monitor import AuxLossController, CollapseDetector  # noqa: E402
from moe_monitor.integrations.transformers import STATE_FILE, MoETrainerCallback  # noqa: E402
from tests.integrations.hf_toys import PaddedTokens, expert_counts, tiny_model, training_args  # noqa: E402
from tests.integrations.tb_read import accumulate, expert_load, main_run  # noqa: E402
from tests.ports import free_port  # noqa: E402


def _events(log_dir: Path) -> Any:
    return accumulate(log_dir)


def _tensorboard_dir(out: Path) -> Path:
    return main_run(out)


def _same(a: Any, b: Any) -> bool:
    """Deep equality of checkpoint states, whose history may hold tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_trainer_windows_counts_and_tensorboard_views_match_an_independent_recount(tmp_path: Path, family: str) -> None:
    # lr=0 keeps the routers fixed, so the counts of the whole epoch can be recounted afterwards, sample by sample.
    model = tiny_model(family)
    train, val = PaddedTokens(16), PaddedTokens(8, offset=100)
    args = training_args(
        tmp_path, learning_rate=0.0, gradient_accumulation_steps=2, report_to=["tensorboard"], eval_strategy="steps",
        eval_steps=4,
    )  # fmt: skip
    callback = MoETrainerCallback()
    Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[callback]).train()

    frame = callback.watcher.layer_frame()
    # Windows of logging_steps=2 optimizer steps, each of 2 micro-batches of 2 samples; one val window per evaluate.
    assert list(zip(frame.step, frame.phase))[::2] == [(2, "train"), (4, "train"), (4, "val")]
    assert frame[frame.phase == "train"].groupby("layer_index").tokens.sum().tolist() == [train.real_tokens()] * 2
    assert (frame[frame.phase == "val"].tokens == val.real_tokens()).all()

    recount_LE = expert_counts(model, train)
    events = _events(_tensorboard_dir(tmp_path))
    for layer in range(2):
        windows = expert_load(events, f"moe/train/expert_load/L{layer:02d}")
        assert [step for step, _ in windows] == [2, 4]
        buckets = [counts for _, counts in windows]
        assert [sum(col) for col in zip(*buckets)] == recount_LE[layer].tolist()
        entropies = {s.step: s.value for s in events.Scalars(f"moe/train/load_entropy/L{layer:02d}")}
        for (step, _), counts in zip(windows, buckets):
            loads = [c / sum(counts) for c in counts]
            expected = -sum(p * math.log(p) for p in loads if p > 0) / math.log(4)
            assert entropies[step] == pytest.approx(expected, abs=1e-6)  # TensorBoard stores float32
    val_hist = expert_load(events, "moe/val/expert_load/L01")
    assert [counts for _, counts in val_hist] == [expert_counts(model, val)[1].tolist()]
    assert "moe/train/load_heatmap" in events.Tags()["images"]
    # trainer_state.json keeps the scalars too, and the history files are on disk.
    logged = [h for h in callback.state.log_history if "moe/train/load_entropy/L00" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert len(pd.read_csv(tmp_path / "moe_monitor" / "layers.csv")) == len(frame)


def test_sft_trainer_counts_the_tokens_trl_counts(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), pad_token="t0", eos_token="t2"
    )
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 9, (16,), generator=generator).tolist()
    rows = [{"input_ids": torch.randint(3, 64, (n,), generator=generator).tolist()} for n in lengths]
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip
    callback = MoETrainerCallback()
    trainer = SFTTrainer(
        model=tiny_model("qwen3_moe"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    frame = callback.watcher.layer_frame()
    assert sorted(set(frame.step)) == [2, 4]
    assert trainer.args.gradient_checkpointing  # SFTConfig's default: every block's forward runs again in backward
    # SFTTrainer's own running count of the (non-padding) tokens it fed the model, at each logging step.
    trl_counts = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    ours = frame[frame.layer_index == 0].tokens.cumsum().tolist()
    assert ours == trl_counts
    assert ours[-1] == sum(lengths)  # the whole dataset, once (checkpointed recomputes not counted)


class _Capture(TrainerCallback):
    """Records the monitor's state as training begins (right after the monitor restored it)."""

    def __init__(self, monitor: MoETrainerCallback) -> None:
        self.monitor = monitor
        self.at_begin: dict[str, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.at_begin = self.monitor.watcher.state_dict()


def _forced(**kwargs: Any) -> MoETrainerCallback:
    # A threshold no real router meets: every window alerts, and the controller doubles the aux-loss coefficient.
    detector = CollapseDetector(min_load_entropy=0.9999, patience=1)
    return MoETrainerCallback(detector=detector, controllers=[AuxLossController(max_coef=1.0)], **kwargs)


def test_resume_restores_the_state_saved_in_the_checkpoint(tmp_path: Path) -> None:
    first = _forced()
    model = tiny_model("mixtral")
    args = training_args(tmp_path, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=args, train_dataset=PaddedTokens(16), callbacks=[first]).train()
    assert model.config.router_aux_loss_coef == pytest.approx(0.01 * 4)  # doubled at steps 2 and 4
    saved = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)

    second = _forced()
    capture = _Capture(second)
    resumed_model = tiny_model("mixtral", seed=1)
    trainer = Trainer(model=resumed_model, args=args, train_dataset=PaddedTokens(16), callbacks=[second, capture])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert _same(capture.at_begin, saved)
    # The controller carried on from the restored coefficient (0.02 -> 0.04), not from the model's 0.01.
    assert resumed_model.config.router_aux_loss_coef == pytest.approx(0.01 * 4)
    frame, before = second.watcher.layer_frame(), first.watcher.layer_frame()
    assert frame.step.tolist() == [2, 2, 4, 4]
    assert frame[frame.step == 2].reset_index(drop=True).equals(before[before.step == 2].reset_index(drop=True))
    # The detector remembers the alert of step 2: still active, so no second alert at step 4.
    alerts = second.watcher.event_frame().query("kind == 'alert' and rule == 'load_entropy'")
    assert sorted(set(alerts.step)) == [2]
    # The files continue the history without gap or duplicate, restored events included.
    files = tmp_path / "moe_monitor"
    assert pd.read_csv(files / "layers.csv").step.tolist() == [2, 2, 4, 4]
    on_disk = pd.read_csv(files / "events.csv")
    assert on_disk[["step", "kind", "rule"]].equals(second.watcher.event_frame()[["step", "kind", "rule"]])


def test_stop_on_collapse_stops_the_trainer_at_the_first_critical_window(tmp_path: Path) -> None:
    callback = _forced(stop_on_collapse=True)
    trainer = Trainer(
        model=tiny_model("mixtral"), args=training_args(tmp_path, max_steps=8), train_dataset=PaddedTokens(32),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2


def test_two_unnamed_callbacks_are_refused_and_named_ones_keep_apart(tmp_path: Path) -> None:
    args = training_args(tmp_path, report_to=["tensorboard"])
    with pytest.raises(ValueError, match="distinct name"):
        Trainer(model=tiny_model("mixtral"), args=args, callbacks=[MoETrainerCallback(), MoETrainerCallback()])
    fast, slow = MoETrainerCallback(log_every=1, name="fast"), MoETrainerCallback(log_every=2, name="slow")
    Trainer(model=tiny_model("mixtral"), args=args, train_dataset=PaddedTokens(8), callbacks=[fast, slow]).train()
    events = _events(_tensorboard_dir(tmp_path))
    assert [s.step for s in events.Scalars("moe/fast/train/load_entropy/L00")] == [1, 2, 3, 4]
    assert [s.step for s in events.Scalars("moe/slow/train/load_entropy/L00")] == [2, 4]
    assert "moe/train/load_entropy/L00" not in events.Tags()["scalars"]
    fast_rows = pd.read_csv(tmp_path / "moe_monitor" / "fast" / "layers.csv")
    slow_rows = pd.read_csv(tmp_path / "moe_monitor" / "slow" / "layers.csv")
    assert (len(fast_rows), len(slow_rows)) == (8, 4)


@pytest.mark.slow
def test_two_processes_reduce_every_window_over_both(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_trainer.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(script), str(tmp_path),
    ]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    frames = [pd.read_csv(tmp_path / f"rank{rank}.csv") for rank in (0, 1)]
    assert frames[0].equals(frames[1])  # every process saw the same reduced windows
    # One window of the whole epoch: the distributed sampler gives each process half of the 16 samples; the
    # evaluation at step 4 is one window over both processes' halves of the 8 samples.
    train, val = frames[0][frames[0].phase == "train"], frames[0][frames[0].phase == "val"]
    assert train.step.tolist() == [4, 4] and val.step.tolist() == [4, 4]
    assert (train.tokens == PaddedTokens(16).real_tokens()).all()
    assert (val.tokens == PaddedTokens(8, offset=100).real_tokens()).all()


@pytest.mark.slow
def test_wandb_integration_gets_the_rich_views_without_a_fault(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    callback = MoETrainerCallback(log_every=2)
    args = training_args(tmp_path, report_to=["wandb"], run_name="moe")
    Trainer(model=tiny_model("mixtral"), args=args, train_dataset=PaddedTokens(8), callbacks=[callback]).train()
    kinds = [type(sink).__name__ for sink in callback.watcher.sinks]
    assert "WandbSink" in kinds and kinds.count("ScalarSink") == 1  # the Trainer's own W&B run, scalars included
    assert all(sink.failures == 0 for sink in callback.watcher.sinks)
    import wandb

    wandb.finish()  # the offline log is complete once the run has finished
    (run_file,) = tmp_path.glob("**/offline-run-*/run-*.wandb")
    log = run_file.read_bytes()  # history records keep their keys as plain strings
    for key in ("moe/train/load_entropy/L00", "moe/train/expert_load/L01", "moe/train/load_heatmap"):
        assert key.encode() in log, key
