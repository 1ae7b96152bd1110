"""Tiny random-config Hugging Face MoE models, token-id datasets and Trainer arguments (no download, CPU)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

VOCAB = 64
SEQ_LEN = 8


def tiny_model(family: str, seed: int = 0) -> Any:
    """A two-layer, four-expert, top-2 Mixtral or Qwen3-MoE built from its config (random weights)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01,
        pad_token_id=0,
    )  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, **common)
        return transformers.MixtralForCausalLM(config)
    config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, head_dim=16, **common)
    return transformers.Qwen3MoeForCausalLM(config)


class PaddedTokens(torch.utils.data.Dataset):
    """``n`` samples of ``SEQ_LEN`` token ids; sample ``i`` has ``real_length(i)`` real tokens, the rest padding."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def real_length(i: int) -> int:
        return SEQ_LEN - i % 4  # 8, 7, 6, 5 real tokens

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.offset + i)
        ids = torch.randint(1, VOCAB, (SEQ_LEN,), generator=generator)
        mask = (torch.arange(SEQ_LEN) < self.real_length(i)).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}

    def real_tokens(self) -> int:
        return sum(self.real_length(i) for i in range(self.n))


def stacked(dataset: PaddedTokens, indices: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Samples ``indices`` (default: all) of ``dataset`` as one batch."""
    samples = [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


def expert_counts(model: Any, dataset: PaddedTokens, top_k: int = 2) -> torch.Tensor:
    """``int64 [L, E]`` assignments per expert over ``dataset``, recomputed one sample at a time from the router
    logits the model returns with ``output_router_logits=True`` (padding left out)."""
    model.eval()
    total = None
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            real = sample["attention_mask"].bool()
            out = model(input_ids=sample["input_ids"][None], attention_mask=sample["attention_mask"][None])
            counts = []
            for logits_TE in out.router_logits:
                chosen = logits_TE.float().softmax(-1).topk(top_k, dim=-1).indices[real]
                counts.append(torch.bincount(chosen.flatten(), minlength=logits_TE.shape[-1]))
            stacked = torch.stack(counts)
            total = stacked if total is None else total + stacked
    model.train()
    return total


def training_args(out: Any, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    options = dict(
        output_dir=os.fspath(out), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    options.update(overrides)
    return TrainingArguments(**options)

