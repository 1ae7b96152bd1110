"""Monitor the routers of a Hugging Face Mixtral trained with ``transformers.Trainer`` (a tiny random one, no download).

Run: ``python examples/huggingface_trainer.py --out runs/hf_trainer``, then ``tensorboard --logdir runs/hf_trainer``:
the Trainer's own TensorBoard run gets ``moe/train/...`` and ``moe/val/...`` scalars, expert-load histograms and
heatmaps; ``runs/hf_trainer/moe_monitor/layers.csv`` holds the history, and every ``checkpoint-<step>`` folder the
monitor's state, so ``trainer.train(resume_from_checkpoint=True)`` continues it.
"""

from __future__ import annotations

import argparse

import torch


class TokenIds(torch.utils.data.Dataset):
    """Random token ids with right padding: the last ``pad`` positions of every sample are masked out."""

    def __init__(self, samples: int, seq_len: int = 32, pad: int = 8, vocab: int = 256, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (samples, seq_len), generator=generator)
        self.mask = torch.ones_like(self.ids)
        self.mask[:, seq_len - pad :] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def main(argv: list[str] | None = None):
    from transformers import Trainer, TrainingArguments

    from moe_monitor.integrations.transformers import MoETrainerCallback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=max(1, args.steps // 4), eval_strategy="steps",
        eval_steps=max(1, args.steps // 2), save_steps=max(1, args.steps // 2), report_to=["tensorboard"],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    # Windows of `logging_steps` optimizer steps; padding left out through the batch's attention_mask.
    callback = MoETrainerCallback()
    trainer = Trainer(
        model=tiny_mixtral(),
        args=training,
        train_dataset=TokenIds(256),
        eval_dataset=TokenIds(16, seed=1),
        callbacks=[callback],
    )
    trainer.train()
    frame = callback.watcher.layer_frame()
    print(frame[["step", "phase", "layer", "tokens", "load_entropy", "max_violation"]].to_string())
    return trainer, callback


if __name__ == "__main__":
    main()
