"""Family: Hugging Face transformers (5.x) MoE routers, found with no configuration.

Shape legend: ``T`` tokens in one forward, ``E`` experts, ``k`` experts chosen per token.

transformers 5.x declares, on every MoE model class, which module produces the router logits:
``_can_record_outputs["router_logits"] = OutputRecorder(target_class, index=i)``. The monitor reads that registry
(so any family following the contract works unchanged) and hooks the same modules. What such a router returns:

- ``(logits, scores, indices)`` (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3 and most families): ``logits [T, E]``,
  ``indices [T, k]`` the chosen experts, used as they are (they may differ from the top-k of the logits, e.g.
  DeepSeek-V3's bias-corrected, group-limited choice);
- Switch Transformers' ``(expert_mask, max_prob, logits)``: ``expert_mask [B, S, E]`` is the one-hot choice *after*
  capacity, all-zero rows being dropped tokens; the chosen expert of a dropped token is the argmax of its logits;
- anything else: the logits at the registry's ``index``; the top-``k`` experts are recomputed from them (older gates
  that are a bare ``nn.Linear`` returning logits are handled the same way, ``k`` read from the model config).

Sigmoid-scored routers (DeepSeek-V3 and its descendants, recognised by an ``e_score_correction_bias`` buffer or a
``scoring_func="sigmoid"`` config; Llama 4) get :func:`moe_monitor.families.base.sigmoid_probs` as probabilities.

Knobs: the model-wide ``router_aux_loss_coef`` on the ``...ForCausalLM`` module and its config (inert unless
``config.output_router_logits``), Mixtral-style ``jitter_noise`` on the MoE block, DeepSeek-V3's
``e_score_correction_bias`` buffer: the conventions :func:`moe_monitor.knobs.generic_knobs` looks up.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from moe_monitor.families.base import (
    Extract,
    RouterLayer,
    module_num_experts,
    module_top_k,
    output_extract,
    sigmoid_probs,
)
from moe_monitor.knobs import generic_knobs
from moe_monitor.routing import Routing

NAME = "hf"
SEARCHED = (
    "Hugging Face transformers MoE routers: the classes in a model's _can_record_outputs['router_logits'] "
    "(Mixtral, Qwen2-MoE, OLMoE, Switch Transformers, DeepSeek-V3 and every family following that contract); "
    "older Hugging Face gates: an nn.Linear named '...gate' or '...router' with config.num_experts outputs"
)

_CONFIG_TOP_K = ("num_experts_per_tok", "top_k", "moe_topk", "num_selected_experts", "moe_k", "router_topk")
_CONFIG_NUM_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    return text_config if text_config is not None and not hasattr(config, "num_experts_per_tok") else config


def _config_int(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _recorders(model: nn.Module) -> list[tuple[type | None, str | None, str | None, int]]:
    """``(target_class, class_name, layer_name, index)`` of every ``router_logits`` recorder in the model."""
    found = []
    for module in model.modules():
        registry = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(registry, dict) or "router_logits" not in registry:
            continue
        specs = registry["router_logits"]
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, type):
                # transformers' own default for a bare class under a non-hidden-states key.
                found.append((spec, None, None, 1))
            elif isinstance(spec, str):
                found.append((None, spec, None, 1))
            else:
                found.append(
                    (
                        getattr(spec, "target_class", None),
                        getattr(spec, "class_name", None),
                        getattr(spec, "layer_name", None),
                        getattr(spec, "index", 0),
                    )
                )
    return list(dict.fromkeys(found))


def _matches(name: str, module: nn.Module, recorder: tuple[type | None, str | None, str | None, int]) -> bool:
    target_class, class_name, layer_name, _ = recorder
    # Same matching rules as transformers' own output capturing, so we hook exactly the modules it records.
    hit = (target_class is not None and isinstance(module, target_class)) or (
        class_name is not None and name.endswith(class_name)
    )
    if hit and layer_name is not None:
        hit = "." + layer_name.strip(".") + "." in "." + name + "."
    return hit


def _is_sigmoid(module: nn.Module, config: Any) -> bool:
    if hasattr(module, "e_score_correction_bias"):
        return True
    if getattr(config, "scoring_func", None) == "sigmoid" or getattr(config, "topk_method", None) == "noaux_tc":
        return True
    return type(module).__name__.startswith("Llama4")


def _is_index_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()


def tuple_extract(index: int, num_experts: int, top_k: int, sigmoid: bool) -> Extract:
    """Extraction function for a transformers router output (see the module docstring for the layouts).

    The layout is told apart from tensor metadata only (dtype, shape), so reading it never synchronises.

    Example:
        >>> fn = tuple_extract(index=0, num_experts=3, top_k=1, sigmoid=False)
        >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
        >>> fn(None, (), (logits, torch.tensor([[1.0]]), torch.tensor([[2]]))).expert_idx_A.tolist()
        [2]
    """

    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        is_tuple = isinstance(output, (tuple, list))
        logits = output[index] if is_tuple else output
        logits_TE = logits.reshape(-1, logits.shape[-1])
        probs_TE = sigmoid_probs(logits_TE) if sigmoid else None
        if is_tuple and len(output) >= 3 and index != len(output) - 1:
            last = output[-1]
            if _is_index_tensor(last) and last.shape[-1] == top_k and last.numel() == logits_TE.shape[0] * top_k:
                return Routing.from_topk(last.reshape(-1, top_k), logits_TE=logits_TE, probs_TE=probs_TE)
        if is_tuple and index != 0 and top_k == 1 and _is_index_tensor(output[0]) and output[0].shape == logits.shape:
            # Switch-style one-hot dispatch mask after capacity: an all-zero row is a dropped token.
            mask_TE = output[0].reshape(-1, logits_TE.shape[-1])
            kept_T = mask_TE.sum(dim=-1) > 0
            chosen_T = torch.where(kept_T, mask_TE.argmax(dim=-1), logits_TE.argmax(dim=-1))
            return Routing.from_topk(chosen_T[:, None], logits_TE=logits_TE, probs_TE=probs_TE, kept_TK=kept_T[:, None])
        topk_idx_TK = logits_TE.topk(top_k, dim=-1).indices
        return Routing.from_topk(topk_idx_TK, logits_TE=logits_TE, probs_TE=probs_TE)

    return extract


def _layer(name: str, module: nn.Module, index: int, config: Any, adapter: str) -> RouterLayer | None:
    num_experts = module_num_experts(module) or _config_int(config, _CONFIG_NUM_EXPERTS)
    top_k = module_top_k(module) or _config_int(config, _CONFIG_TOP_K)
    cls = type(module).__name__
    if top_k is None and "Top1" in cls:
        top_k = 1
    if top_k is None and "Top2" in cls:
        top_k = 2
    if num_experts is None or top_k is None:
        warnings.warn(
            f"moe_monitor: skipping router {name!r} ({cls}): cannot tell its number of experts / top_k; register it "
            f"with RouterSpec(name={name!r}, num_experts=E, top_k=k)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    sigmoid = _is_sigmoid(module, config)
    if adapter == "hf-linear":
        extract = output_extract(top_k, probs="sigmoid" if sigmoid else "softmax", num_experts=num_experts)
    else:
        extract = tuple_extract(index, num_experts, top_k, sigmoid)
    # Routers with a fixed expert capacity (Switch) drop assignments; the rest are dropless.
    dropless = getattr(module, "expert_capacity", None) is None
    meta = {"probs": "sigmoid-normalised" if sigmoid else "softmax", "knobs": generic_knobs, "logits": "router output"}
    return RouterLayer(name, module, num_experts, top_k, extract, "token_choice", dropless, adapter, meta)


def describe(name: str, module: nn.Module, model: nn.Module) -> RouterLayer | None:
    """The :class:`RouterLayer` of ``module`` if it is a router class in ``model``'s registry, else ``None``.

    Example:
        >>> describe("0", nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 4))) is None  # not a transformers router class
        True
    """
    if "transformers" not in sys.modules:
        return None
    for recorder in _recorders(model):
        if _matches(name, module, recorder):
            return _layer(name, module, recorder[3], _config(model), "hf")
    return None


def discover(model: nn.Module) -> list[RouterLayer]:
    """Every router of a transformers model, in model order (empty for anything else).

    Example:
        >>> discover(nn.Linear(4, 4))
        []
    """
    # A model built with transformers has imported it; anything else is not a transformers model.
    if "transformers" not in sys.modules:
        return []
    config = _config(model)
    recorders = _recorders(model)
    found: list[RouterLayer] = []
    if recorders:
        for name, module in model.named_modules():
            recorder = next((r for r in recorders if _matches(name, module, r)), None)
            if recorder is not None:
                layer = _layer(name, module, recorder[3], config, "hf")
                if layer is not None:
                    found.append(layer)
    if found or config is None:
        return found
    num_experts = _config_int(config, _CONFIG_NUM_EXPERTS)
    if num_experts is None or _config_int(config, _CONFIG_TOP_K) is None:
        return []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and module.out_features == num_experts and leaf in ("gate", "router"):
            layer = _layer(name, module, 0, config, "hf-linear")
            if layer is not None:
                found.append(layer)
    return found
