"""MoETransformer shapes, causality, losses, module tree and errors."""

from __future__ import annotations

import pytest
import torch

from moe_monitor.reference import PRESETS, MoEConfig, MoEOutput, MoETransformer, Router, RouterOutput


def test_output_shapes_and_types(make_config):
    model = MoETransformer(make_config())
    out = model(torch.randint(0, 256, (3, 10)))
    assert isinstance(out, MoEOutput)
    assert out.logits.shape == (3, 10, 256)
    assert out.aux_loss.shape == out.z_loss.shape == ()


@pytest.mark.parametrize(
    ("capacity_factor", "batch"),
    # With capacity, drops go in token order over the flattened batch, so a later token of sequence 0 can take
    # the capacity of an earlier token of sequence 1: causal within one sequence, checked with a batch of 1.
    [(None, 2), (1.0, 1), (0.5, 1)],
)
def test_causality(make_config, capacity_factor, batch):
    torch.manual_seed(0)
    model = MoETransformer(make_config(capacity_factor=capacity_factor)).eval()
    tokens = torch.randint(0, 256, (batch, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_expert_choice_is_not_causal_as_documented(make_config):
    torch.manual_seed(0)
    model = MoETransformer(make_config(router="expert_choice")).eval()
    tokens = torch.randint(0, 256, (1, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    # Each expert picks its top-C tokens among all of them, later ones included.
    assert not torch.allclose(model(tokens).logits[:, :8], model(changed).logits[:, :8], atol=1e-6)


def test_too_long_sequence_raises(make_config):
    model = MoETransformer(make_config(seq_len=8))
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds the model's seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_losses_are_sums_over_moe_layers(make_config):
    model = MoETransformer(make_config(n_layers=3, aux_loss_coef=0.1, z_loss_coef=0.01))
    outputs: list[RouterOutput] = []
    for router in model.routers:
        router.register_forward_hook(lambda module, args, output: outputs.append(output))
    out = model(torch.randint(0, 256, (2, 8)))
    assert len(outputs) == 3
    torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in outputs))
    torch.testing.assert_close(out.z_loss, sum(o.z_loss for o in outputs))
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0


def test_zero_coefficients_give_zero_losses(make_config):
    out = MoETransformer(make_config(aux_loss_coef=0.0, z_loss_coef=0.0))(torch.randint(0, 256, (1, 4)))
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0


def test_module_tree_with_dense_blocks(make_config):
    model = MoETransformer(make_config(n_layers=4, dense_every=2))
    assert [hasattr(block, "moe") for block in model.blocks] == [True, False, True, False]
    assert all(hasattr(block, "mlp") for block in model.blocks[1::2])
    assert isinstance(model.blocks[0].moe.router, Router)
    assert [name for name, m in model.named_modules() if isinstance(m, Router)] == [
        "blocks.0.moe.router",
        "blocks.2.moe.router",
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    config = MoEConfig.from_preset(name)
    assert config.d_model % config.n_heads == 0 and config.top_k <= config.n_experts


def test_tiny_preset_runs():
    model = MoETransformer(MoEConfig.from_preset("tiny"))
    assert model(torch.randint(0, 256, (1, 16))).logits.shape == (1, 16, 256)


def test_bf16_autocast_forward_backward(make_config):
    model = MoETransformer(make_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 256, (2, 8)))
    (out.logits.float().mean() + out.aux_loss + out.z_loss).backward()
    assert out.aux_loss.dtype == torch.float32
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
