"""What every model family shares: the layer record, manual registration, and reading a router's output.

Shape legend: ``T`` tokens in one forward, ``E`` experts, ``k`` experts chosen per token, ``A`` assignments.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_monitor.routing import Routing

Extract = Callable[[nn.Module, tuple, Any], Routing]
"""``fn(module, args, output) -> Routing``: reads one forward of a router from its forward hook."""

ROUTER_KINDS = ("token_choice", "expert_choice")


class NoRoutersFoundError(ValueError):
    """Raised when a model has no router the monitor can recognise; the message says how to register one.

    Example:
        >>> from moe_monitor import RouterMonitor
        >>> try:
        ...     RouterMonitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        ... except NoRoutersFoundError as error:
        ...     print(type(error).__name__, isinstance(error, ValueError))
        NoRoutersFoundError True
    """


class RouterOutputError(ValueError):
    """A router's output does not have the layout its family (or the generic reader) expects; the message says why.

    Example:
        >>> try:
        ...     read_output(torch.randn(3, 2), num_experts=4, top_k=2)
        ... except RouterOutputError as error:
        ...     print(str(error).split(":")[0])
        the router returned float32[3, 2]
    """


@dataclass
class RouterSpec:
    """Registers a router by hand.

    Args:
        name: module path, as in ``model.named_modules()``; give this or ``module``.
        module: the router module itself.
        num_experts: ``E``; read from the module (``num_experts``/``n_experts``/``out_features``) when ``None``.
        top_k: experts chosen per token; read from the module (``top_k``) when ``None``.
        extract: ``fn(module, args, output) -> Routing`` mapping the hooked output; when ``None`` the output is read
            by :func:`read_output`: an integer ``[..., k]`` tensor is the chosen experts and a float ``[..., E]``
            tensor the logits (the top-``k`` experts are recomputed from the logits when no index tensor is there).
        kind: ``"token_choice"`` or ``"expert_choice"``.
        dropless: whether the router never drops assignments for capacity; the counterfactual drop rate is only
            computed for dropless token-choice routers. With ``dropless=False`` and an extract function that gives
            no ``kept_A``, the dropped fraction is unknown: NaN, not 0.

    Example:
        >>> gate = nn.Linear(16, 4, bias=False)
        >>> spec = RouterSpec(module=gate, top_k=2)
        >>> spec.kind, spec.num_experts is None
        ('token_choice', True)
    """

    name: str | None = None
    module: nn.Module | None = None
    num_experts: int | None = None
    top_k: int | None = None
    extract: Extract | None = None
    kind: str = "token_choice"
    dropless: bool = True


@dataclass
class RouterLayer:
    """One monitored router, as listed in ``RouterMonitor.layers`` (model order).

    Attributes:
        name: module path, as in ``model.named_modules()``.
        module: the router module the hook sits on.
        num_experts: ``E``.
        top_k: experts chosen per token (for expert choice, the average experts per token the capacity allows).
        extract: the family's ``fn(module, args, output) -> Routing``.
        kind: ``"token_choice"`` or ``"expert_choice"``.
        dropless: ``True`` when the router never drops assignments for capacity.
        adapter: the family that found it (``"manual"``, ``"reference"``, ``"hf"``, ``"hf-linear"``, ``"torchtitan"``,
            ``"deepspeed"``, ``"olmo-core"``, ``"megatron"``, ``"st-moe"``, ``"mixture-of-experts"``, ``"generic"``).
        meta: what the family knows beyond the fields: ``"knobs"`` (``fn(model, layer_path) -> LayerKnobs``, read by
            :func:`moe_monitor.knobs.layer_knobs`), ``"probs"`` (how probabilities are derived), ``"logits"`` (where
            the logits come from, or ``None``), ``"assumed"`` (the generic fallback's guesses).
        live: for routers whose kind and capacity may change between steps (the reference router),
            ``fn(module) -> (kind, dropless)`` read at every forward instead of ``kind`` and ``dropless``.
        path: the module path in this process's model, where its knobs are looked up; the same as ``name``
            unless the family names the layer by its place in the whole model (a Megatron-Core pipeline stage's
            local ``decoder.layers.0`` named by its global layer number).

    Example:
        >>> from moe_monitor.families.manual import layers
        >>> layer = layers(nn.Sequential(nn.Linear(8, 4)), [RouterSpec(name="0", top_k=2)], lambda *a: None)[0]
        >>> layer.name, layer.num_experts, layer.top_k, layer.kind, layer.adapter
        ('0', 4, 2, 'token_choice', 'manual')
    """

    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    extract: Extract
    kind: str = "token_choice"
    dropless: bool = True
    adapter: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    live: Callable[[nn.Module], tuple[str, bool]] | None = field(default=None, repr=False)
    path: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.path:
            self.path = self.name


def class_path(module: Any) -> set[tuple[str, str]]:
    """``(module, class name)`` of the object's class and every base class, for matching without importing them.

    Example:
        >>> ("torch.nn.modules.linear", "Linear") in class_path(nn.Linear(1, 1))
        True
    """
    return {(cls.__module__, cls.__name__) for cls in type(module).__mro__}


def is_instance_of(module: Any, library: str, names: tuple[str, ...]) -> bool:
    """Whether a class in the object's MRO is named one of ``names`` and defined in a module of ``library``.

    ``False`` at once when ``library`` was never imported: a model built with a library has imported it, so a family
    never imports its library.

    Example:
        >>> is_instance_of(nn.Linear(1, 1), "torch.nn", ("Linear",)), is_instance_of(nn.ReLU(), "torch", ("Linear",))
        (True, False)
    """
    if library.partition(".")[0] not in sys.modules:
        return False
    return any(name in names and (mod == library or mod.startswith(library + ".")) for mod, name in class_path(module))


def find(model: nn.Module, library: str, describe: Callable[[str, nn.Module, nn.Module], Any]) -> list[Any]:
    """Every layer ``describe(name, module, model)`` gives for the modules of ``model``, in model order; ``[]`` at
    once when ``library`` was never imported.

    Example:
        >>> find(nn.Sequential(nn.Linear(2, 2)), "torch", lambda name, module, model: name or None)
        ['0']
    """
    if library.partition(".")[0] not in sys.modules:
        return []
    return [layer for name, module in model.named_modules() if (layer := describe(name, module, model)) is not None]


def positive_int(obj: Any, *attrs: str) -> int | None:
    """The first attribute of ``obj`` (dotted names reach into sub-objects) that is a positive ``int``, or ``None``.

    Example:
        >>> positive_int(nn.Linear(3, 5), "num_experts", "out_features")
        5
    """
    for attr in attrs:
        value: Any = obj
        for part in attr.split("."):
            value = getattr(value, part, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def module_num_experts(module: nn.Module) -> int | None:
    """Reads ``E`` from the usual attribute names of a router module, or ``None``.

    Example:
        >>> module_num_experts(nn.Linear(16, 8)), module_num_experts(nn.ReLU())
        (8, None)
    """
    return positive_int(module, "num_experts", "n_experts", "n_routed_experts", "num_local_experts", "out_features")


def module_top_k(module: nn.Module) -> int | None:
    """Reads ``k`` from the usual attribute names of a router module, or ``None``.

    Example:
        >>> gate = nn.Linear(16, 8)
        >>> gate.num_experts_per_tok = 2
        >>> module_top_k(gate), module_top_k(nn.ReLU())
        (2, None)
    """
    return positive_int(module, "top_k", "num_experts_per_tok", "k")


def sigmoid_probs(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router probabilities of a sigmoid-scored router (DeepSeek-V3 style), ``float32 [T, E]``.

    A sigmoid router scores each expert independently, so its scores do not form a distribution. The monitor uses
    the scores normalised per token, ``p_e = sigmoid(z_e) / sum_f sigmoid(z_f)`` — the normalised affinity that
    DeepSeek-V3 uses in its sequence-wise balance loss — for ``aux_loss``, ``router_entropy`` and
    ``top1_confidence``. ``z_loss`` stays defined on the raw logits.

    Example:
        >>> sigmoid_probs(torch.zeros(1, 4)).tolist()
        [[0.25, 0.25, 0.25, 0.25]]
    """
    scores_TE = logits_TE.float().sigmoid()
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def _is_index(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and not (value.is_floating_point() or value.is_complex())


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.is_floating_point()


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [value for value in output if isinstance(value, torch.Tensor)]
    return []


def describe_output(output: Any) -> str:
    """The output's layout in words, for messages: ``(float32[4, 8], int64[4, 2])``.

    Example:
        >>> describe_output((torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.long)))
        '(float32[4, 8], int64[4, 2])'
    """
    parts = [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in _tensors(output)]
    if isinstance(output, torch.Tensor):
        return parts[0]
    return f"({', '.join(parts)})" if parts else type(output).__name__


def read_output(output: Any, num_experts: int, top_k: int, probs: str = "softmax") -> Routing:
    """Reads a router output that is a score tensor ``[..., E]`` and/or an integer index tensor ``[..., k]``.

    Accepts a tensor, a tuple/list/dict of tensors, or ``torch.topk``'s output. The chosen experts are the integer
    ``[..., k]`` tensor when there is one (after any routing bias, as the router chose them), else the top-``k`` of the
    scores. A float ``[..., E]`` tensor is read as the logits only when it has one row per token (a dispatch or
    combine tensor ``[T, E, C]`` with ``C == E`` has more). The layout is told from shapes and dtypes only, so this
    never synchronises.

    Args:
        output: what the router's forward returned.
        num_experts: ``E``.
        top_k: ``k``.
        probs: ``"softmax"`` or ``"sigmoid"`` (see :func:`sigmoid_probs`): how the logits become probabilities.

    Raises:
        RouterOutputError: neither an index tensor nor a score tensor is there; the message says what was found.

    Example:
        >>> values, indices = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]]).topk(1)
        >>> read_output(torch.return_types.topk((values, indices)), num_experts=3, top_k=1).expert_idx_A.tolist()
        [1, 0]
        >>> read_output(torch.zeros(2, 4, 3), num_experts=3, top_k=2).num_tokens
        8
    """
    tensors = _tensors(output)
    index = next((t for t in tensors if _is_index(t) and t.shape[-1] == top_k), None)
    tokens = None if index is None else index.numel() // top_k
    logits = next(
        (
            t
            for t in tensors
            if _is_float(t) and t.shape[-1] == num_experts and (tokens is None or t.numel() == tokens * num_experts)
        ),
        None,
    )
    if logits is not None:
        # A float [T, E] tensor next to a [T, k] index tensor, or alone: never a [T, E, C] dispatch/combine tensor.
        logits_TE = logits.reshape(-1, num_experts)
        probs_TE = sigmoid_probs(logits_TE) if probs == "sigmoid" else None
        if index is None:
            # Top-k of the logits equals top-k of softmax or sigmoid scores: both are monotonic per token.
            index = logits_TE.topk(min(top_k, num_experts), dim=-1).indices
        return Routing.from_topk(index, logits_TE=logits_TE, probs_TE=probs_TE)
    if index is not None:
        return Routing.from_topk(index)
    weights = next((t for t in tensors if _is_float(t) and t.shape[-1] == top_k), None)
    hint = (
        f" A float [..., {top_k}] tensor is there: that is the top-k weights, not the {num_experts} expert scores."
        if weights is not None
        else ""
    )
    raise RouterOutputError(
        f"the router returned {describe_output(output)}: no integer [..., {top_k}] tensor of chosen experts and no "
        f"float [..., {num_experts}] tensor of expert scores with one row per token.{hint}"
    )


def output_extract(top_k: int, probs: str = "softmax", num_experts: int | None = None) -> Extract:
    """Builds an extraction function that reads the hooked output with :func:`read_output`.

    Args:
        top_k: experts chosen per token.
        probs: ``"softmax"`` or ``"sigmoid"`` (see :func:`sigmoid_probs`).
        num_experts: ``E``; ``None`` reads it from the width of the output's first float tensor (a bare gate).

    Example:
        >>> fn = output_extract(top_k=1)
        >>> r = fn(None, (), torch.tensor([[0.0, 3.0], [2.0, 1.0]]))
        >>> r.expert_idx_A.tolist(), r.num_tokens
        ([1, 0], 2)
    """
    if probs not in ("softmax", "sigmoid"):
        raise ValueError(f"probs must be 'softmax' or 'sigmoid', got {probs!r}")

    def extract(module: nn.Module, args: tuple, output: Any) -> Routing:
        width = num_experts
        if width is None:
            first = next((t for t in _tensors(output) if _is_float(t)), None)
            width = first.shape[-1] if first is not None else 0
        return read_output(output, width, top_k, probs)

    return extract


logits_extract = output_extract
"""Former name of :func:`output_extract` (a router whose output, or its first float tensor, is the logits)."""


def module_logit_width(module: nn.Module) -> int | None:
    """Expert scores a router module computes, read from the shape of its gate weight (``[E, D]``), or ``None``.

    Example:
        >>> module_logit_width(nn.Linear(16, 8)), module_logit_width(nn.ReLU())
        (8, None)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    # Switch Transformers' router keeps its gate as .classifier, the reference router and others as .gate.
    for attr in ("classifier", "gate", "wg"):
        gate = getattr(module, attr, None)
        if isinstance(gate, nn.Linear):
            return gate.out_features
    # transformers' TopKRouter classes hold the gate weight [E, D] themselves and apply F.linear.
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return None


def check_width(layer: RouterLayer) -> None:
    """Raises ``ValueError`` when the router's gate weight has another number of rows than its expert count.

    Example:
        >>> from moe_monitor.families.manual import layers
        >>> layer = layers(nn.Sequential(nn.Linear(8, 4)), [RouterSpec(name="0", top_k=2)], lambda *a: None)[0]
        >>> check_width(layer)  # 4 rows, 4 experts: fine
        >>> layer.num_experts = 6
        >>> try:
        ...     check_width(layer)
        ... except ValueError as error:
        ...     print(str(error)[:60])
        Router '0' (Linear) computes 4 expert scores (the shape of i
    """
    width = module_logit_width(layer.module)
    if width is not None and width != layer.num_experts:
        raise ValueError(
            f"Router {layer.name!r} ({type(layer.module).__name__}) computes {width} expert scores (the shape of its "
            f"gate weight), but it is registered with num_experts={layer.num_experts}; its statistics would mix up "
            f"experts. Register it with RouterSpec(name={layer.name!r}, num_experts={width}, top_k={layer.top_k})"
            ", or give an extract function if the router's output is not its logits"
        )


class GateStash:
    """Keeps the latest output of a router's gate submodule, for a router whose own output lacks the logits.

    A forward hook on the gate stores its output (detached: no autograd graph is kept alive) and the router's
    extract function takes it: no second matrix product. The stash removes its hook by itself once the router has
    no forward hook left (the monitor was removed), so it never outlives the monitor by more than one forward.

    Args:
        router: the module the monitor hooks.
        gate: the submodule whose output is the logits (``[..., E]``).

    Example:
        >>> router = nn.Sequential(nn.Linear(4, 3))
        >>> handle = router.register_forward_hook(lambda *a: None)
        >>> stash = GateStash(router, router[0])
        >>> _ = router(torch.randn(2, 4))
        >>> stash.take().shape, stash.take()
        (torch.Size([2, 3]), None)
    """

    def __init__(self, router: nn.Module, gate: nn.Module) -> None:
        self._router = router
        self._value: torch.Tensor | None = None
        self._handle = gate.register_forward_hook(self._store)

    def _store(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._router._forward_hooks:
            self._handle.remove()
            self._value = None
            return
        self._value = output.detach() if isinstance(output, torch.Tensor) else None

    def take(self) -> torch.Tensor | None:
        """The gate output of the current forward (then forgotten), or ``None`` when the gate did not run."""
        value, self._value = self._value, None
        return value


class MethodStash:
    """Keeps the latest result of a router method that computes the logits (a wrapper on the instance).

    The wrapper removes itself (restoring the class's method) once the router has no forward hook left.

    Args:
        router: the hooked router module.
        method: name of the method whose result is the logits.

    Example:
        >>> class Router(nn.Linear):
        ...     def logits(self, x):
        ...         return self(x)
        >>> router = Router(4, 3)
        >>> handle = router.register_forward_hook(lambda *a: None)
        >>> stash = MethodStash(router, "logits")
        >>> _ = router.logits(torch.randn(2, 4))
        >>> stash.take().shape
        torch.Size([2, 3])
    """

    def __init__(self, router: nn.Module, method: str) -> None:
        self._value: torch.Tensor | None = None
        original = getattr(type(router), method)

        def wrapper(owner: nn.Module, *args: Any, **kwargs: Any) -> Any:
            result = original(owner, *args, **kwargs)
            if not owner._forward_hooks:
                owner.__dict__.pop(method, None)
                self._value = None
            elif isinstance(result, torch.Tensor):
                self._value = result.detach()
            return result

        # A bound method, not a closure over the router: a deep copy of the model rebinds it to the copy.
        router.__dict__[method] = types.MethodType(wrapper, router)

    def take(self) -> torch.Tensor | None:
        """The logits of the current forward (then forgotten), or ``None``."""
        value, self._value = self._value, None
        return value


def _in_backward() -> bool:
    return getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1


def expect_forward(model: nn.Module, layer: RouterLayer, advice: Callable[[str, nn.Module], str]) -> None:
    """Warns once if the router's parent module runs a forward in which the router's own forward never ran.

    A module registered as a router whose forward is never called (DeepSpeed's ``TopKGate`` applies
    ``F.linear(x, self.wg.weight)`` instead of calling ``wg``) would give empty windows; this check tells the user at
    the end of the first forward of the parent, then removes itself.

    Args:
        model: the model (to name the parent).
        layer: the monitored router.
        advice: ``fn(parent_name, parent) -> str``, what to register instead.

    Example:
        >>> import warnings
        >>> from moe_monitor.families.manual import layers
        >>> class Gate(nn.Module):  # applies its child's weight without calling the child
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.wg = nn.Linear(4, 2, bias=False)
        ...     def forward(self, x):
        ...         return nn.functional.linear(x, self.wg.weight)
        >>> model = nn.Sequential(Gate())
        >>> layer = layers(model, [RouterSpec(name="0.wg", top_k=1)], lambda *a: None)[0]
        >>> handle = layer.module.register_forward_hook(lambda *a: None)  # what the monitor's hook would be
        >>> expect_forward(model, layer, lambda name, parent: f"Register {name!r} instead.")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = model(torch.randn(3, 4))
        >>> "never ran" in str(caught[0].message), str(caught[0].message).endswith("Register '0' instead.")
        (True, True)
    """
    if not layer.path:
        return
    parent_name = layer.path.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return
    if parent is layer.module:
        return
    ran = [False]

    def mark(module: nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            # Confirmed: nothing left to check.
            ran[0] = True
            pre.remove()
            post.remove()

    def check(module: nn.Module, args: tuple, output: Any) -> None:
        # Checked in eager forwards only: a compiled graph cannot read the graph task id without a break.
        if torch.compiler.is_compiling() or _in_backward():
            return
        pre.remove()
        post.remove()
        if not ran[0] and layer.module._forward_hooks:
            warnings.warn(
                f"moe_monitor: router {layer.name!r} ({type(layer.module).__name__}) was registered, but its forward "
                f"never ran during a forward of its parent {parent_name or type(model).__name__!r} "
                f"({type(parent).__name__}), which uses it without calling it (e.g. F.linear on its weight): nothing "
                f"is counted for it. {advice(parent_name, parent)}",
                RuntimeWarning,
                stacklevel=2,
            )

    pre = layer.module.register_forward_pre_hook(mark)
    post = parent.register_forward_hook(check)
