"""Monitor the routers of a Qwen3-MoE fine-tuned with TRL's ``SFTTrainer`` (tiny random model, tokenizer built here).

Run: ``python examples/trl_sft.py --out runs/trl_sft``. ``MoETrainerCallback`` needs nothing TRL-specific: SFTTrainer
is a ``transformers.Trainer``, and the statistics, alerts and controllers work the same (SFTTrainer's default
gradient checkpointing re-runs every forward in backward; those recomputes are not counted).
"""

from __future__ import annotations

import argparse

import torch


def tiny_tokenizer(vocab: int = 256):
    """A word-level tokenizer over the words ``t0 .. t255`` (no download): ``t0`` pads, ``t2`` ends."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1")


def main(argv: list[str] | None = None):
    from datasets import Dataset
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from trl import SFTConfig, SFTTrainer

    from moe_monitor import AuxLossController
    from moe_monitor.integrations.transformers import MoETrainerCallback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/trl_sft")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        output_router_logits=True, router_aux_loss_coef=0.01, pad_token_id=0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (256,), generator=generator).tolist()  # ragged: the collator pads each batch
    rows = [{"input_ids": torch.randint(3, 256, (n,), generator=generator).tolist()} for n in lengths]
    sft = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=max(1, args.steps // 4), report_to=["tensorboard"], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    # The aux-loss controller raises router_aux_loss_coef while a collapse alert fires (and lowers it after).
    callback = MoETrainerCallback(controllers=[AuxLossController()])
    trainer = SFTTrainer(
        model=Qwen3MoeForCausalLM(config),
        args=sft,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    frame = callback.watcher.layer_frame()
    print(frame[["step", "layer", "tokens", "load_entropy", "max_violation", "aux_loss"]].to_string())
    return trainer, callback


if __name__ == "__main__":
    main()
