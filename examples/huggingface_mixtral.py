"""Watch the routers of a Hugging Face Mixtral model (a tiny random one: no download) while it trains.

Run: ``python examples/huggingface_mixtral.py``. Any transformers 5.x MoE family that records its router logits
(Mixtral, Qwen2-MoE, OLMoE, Switch Transformers, DeepSeek-V3, ...) is found the same way, with no configuration.
"""

from __future__ import annotations

import argparse

import torch

from moe_monitor import RouterMonitor


def main(argv: list[str] | None = None):
    from transformers import MixtralConfig, MixtralForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    model = MixtralForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with RouterMonitor(model) as monitor:
        print("routers:", [(layer.name, layer.num_experts, layer.top_k) for layer in monitor.layers])
        for _ in range(args.steps):
            input_ids = torch.randint(0, 256, (4, 32))
            attention_mask = torch.ones_like(input_ids)
            attention_mask[:, 24:] = 0  # the last 8 positions are padding: left out of the counts
            monitor.set_token_mask(attention_mask)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        monitor.collect(step=args.steps)
        frame = monitor.layer_frame()
        print(frame[["layer", "tokens", "load_entropy", "max_violation", "aux_loss", "z_loss"]].to_string())
    return frame


if __name__ == "__main__":
    main()
