"""Audit the routing of a saved model: a tiny random Hugging Face Mixtral (no download), saved with
``save_pretrained`` and checked offline, from Python and as ``moe-monitor audit MODEL_DIR``.

Run: ``python examples/audit.py --out /tmp/audit``. The same works for a real checkpoint folder, e.g.
``moe-monitor audit ./my-finetuned-mixtral --data held_out.txt --output audit.html``, and for the ``.ckpt`` of a
``moe-monitor train`` run (``moe-monitor audit runs/moe/version_0``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moe_monitor.audit import audit


def main(argv: list[str] | None = None):
    from transformers import MixtralConfig, MixtralForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the saved model and the report")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(args.out / "model")

    # Any model object and batches of token ids (with an attention_mask, padding is left out).
    model = MixtralForCausalLM.from_pretrained(args.out / "model")
    batches = [{"input_ids": torch.randint(0, 256, (4, 32)), "attention_mask": torch.ones(4, 32)} for _ in range(4)]
    report = audit(model, batches, max_batches=4)
    print(report)
    print(report.layer_frame()[["layer", "load_entropy", "max_violation", "counterfactual_drop@1.0", "verdict"]])
    print("HTML report:", report.to_html(args.out / "audit.html"))
    return report


if __name__ == "__main__":
    main()
