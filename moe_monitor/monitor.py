"""RouterMonitor: hooks on every router, on-device window counters, one reduction per ``collect``.

Shape legend: ``L`` monitored router layers, ``E`` experts (largest of any layer), ``F`` packed fields per layer
(see :class:`moe_monitor.counters.Layout`), ``T`` tokens in one forward.

Data path: router forward -> adapter ``extract`` -> :class:`~moe_monitor.routing.Routing` ->
:func:`~moe_monitor.counters.forward_update` -> ``window[phase][device] [L, F]`` (float64, on the routers' device)
-> ``collect``: sum over devices, one ``all_reduce``, one host copy -> :func:`moe_monitor.stats.compute` ->
:class:`~moe_monitor.snapshot.Snapshot` -> :class:`~moe_monitor.history.History` (a bounded tail in memory, the full
history in files beside the run) -> ``layer_frame()`` / ``expert_frame()``. This module keeps the hooks, the windows
and ``collect``; the history, its frames, ``save`` and the checkpoint state live in :mod:`moe_monitor.history`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moe_monitor import stats
from moe_monitor.counters import ExpertCountMismatch, Layout, forward_update
from moe_monitor.families import NoRoutersFoundError, RouterLayer, RouterSpec, discover
from moe_monitor.history import EXPERT_COLUMNS, LAYER_COLUMNS, History
from moe_monitor.snapshot import STAT_NAMES, Snapshot

__all__ = ["RouterMonitor", "NoRoutersFoundError", "RouterSpec", "LAYER_COLUMNS", "EXPERT_COLUMNS"]

COACTIVATION_MAX_EXPERTS = 32
"""Largest expert count for which ``coactivation="auto"`` counts co-activation (see :class:`RouterMonitor`)."""


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside the autograd engine during backward (both the reentrant
    # and the non-reentrant implementation); a real forward never runs inside a graph task.
    return _graph_task_id() != -1


@torch.library.custom_op("moe_monitor::forward_weight", mutates_args=())
def _forward_weight(like: torch.Tensor) -> torch.Tensor:
    """``1`` in a forward, ``0`` in a recompute during backward: a 0-dim tensor on ``like``'s device.

    The compiled form of :func:`_in_backward`. A graph cannot branch on the graph task id (dynamo graph-breaks on it
    and ``fullgraph=True`` fails), and tracing the check away would be wrong: a compiled module called inside an
    eager ``torch.utils.checkpoint`` re-runs its whole graph, counter update included, during backward. As an opaque
    op the check runs each time the graph runs, and its result scales the update (a device fill, no host sync).
    """
    return torch.full((), 0.0 if _in_backward() else 1.0, dtype=like.dtype, device=like.device)


@_forward_weight.register_fake
def _(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(())


class RouterMonitor:
    """Counts what every MoE router of a model does, on the device, and turns each window into statistics.

    Forward hooks add each router forward's routing decisions to on-device window counters without any host
    synchronisation; :meth:`collect` closes a window (one ``all_reduce`` for all layers when ``torch.distributed``
    is initialised, one host copy), computes the SPEC §3 statistics and appends them to the history.

    Phases: a router forward in ``training`` mode counts to phase ``"train"``, one in eval mode to ``"val"``;
    ``with monitor.phase("test"):`` overrides both. Each phase has its own window, so validation never mixes
    into training counts, and ``collect(step, phase)`` closes only that phase's window.

    Not counted: forwards re-run by activation checkpointing during backward, and tokens excluded by
    :meth:`set_token_mask`. Micro-batches of gradient accumulation add up in the window.

    Failure policy: routers and their shapes are checked at construction (setup errors raise). If an extraction
    function raises inside a hook, the monitor warns once and stops monitoring that layer (its rows are NaN from
    then on) rather than killing the training step.

    Distributed: every process must call :meth:`collect` for the same phases in the same order (it is a collective).
    When ``torch.distributed`` is initialised and ``process_group`` has more than one process, construction is a
    collective too (every process of the group builds its monitor at the same point): the processes agree on one
    layer layout, the union of their routers (see :func:`agree_layers`), so pipeline stages holding different
    layers, or none, reduce into one snapshot of every layer. Each process counts only the rows of its own routers;
    the others stay zero and the ``all_reduce`` sums them.

    ``torch.compile``: the hooks trace without a graph break (``fullgraph=True`` works). Recomputes stay uncounted
    when compiled modules run inside an eager ``torch.utils.checkpoint``, and when checkpointing inside a compiled
    model makes dynamo fall back to eager for the checkpointed blocks; ``fullgraph=True`` together with checkpointing
    inside the compiled region is refused by dynamo (the counter update is a side effect in a checkpointed region).

    Args:
        model: the model to watch.
        routers: optional manual registration: module names, modules and/or
            :class:`~moe_monitor.adapters.RouterSpec`; when given, only these are monitored.
        coactivation: count, for routers with ``top_k >= 2``, how often two experts are chosen for the same token
            (``Snapshot.extras["coactivation"]``, ``[L, E, E]``). ``"auto"`` (the default) counts it for routers of
            at most :data:`COACTIVATION_MAX_EXPERTS` experts: it costs about ``(2E + 4) / d_model`` of the router's
            own gate matmul per forward (6 % at 128 experts and width 4096) and ``E * E`` buffer entries per layer
            (30 MB at 58 layers x 256 experts, all-reduced at every ``collect``); ``True`` counts it for every
            router with ``top_k >= 2``.
        capacity_factors: capacity factors of the counterfactual drop rate of dropless routers.
        history_dir: write the history to files in this directory as the run goes (see
            :class:`~moe_monitor.history.History`; on one process only, rank zero); ``None`` keeps only the last
            ``keep_windows`` windows, in memory.
        keep_windows: windows kept in memory; ``None`` as many as fit in
            :data:`~moe_monitor.history.MEMORY_BUDGET` bytes.
        process_group: the ``torch.distributed`` process group the windows are summed over (``None``: the default,
            world group): the ranks that see distinct tokens of these layers; see docs/distributed.md, "Which process
            group".

    Attributes:
        layers: the routers monitored on this process, in model order (empty on a pipeline stage without one).
        rows: the snapshot row of each entry of ``layers`` (its position in :attr:`layer_names`).
        pipelined: whether some process of the group holds other layers than the whole layout (pipeline stages);
            the same on every process. ``False`` on one process and for data-parallel replicas of one model.
        history: the :class:`~moe_monitor.history.History` of closed windows.
        process_group: the group given (``None``: the default group); controllers reduce over it too.

    Raises:
        NoRoutersFoundError: the model has no recognisable router (with a process group of several processes: none
            of them has one); the message says how to register one.
        ValueError: an argument is out of range; or, across a process group, the processes disagree on the layers
            (see :func:`agree_layers`) or the setup failed on another process.
        FileExistsError: ``history_dir`` holds another run's history (see :meth:`History.open`).

    Example:
        >>> from moe_monitor.adapters import RouterSpec
        >>> gate = nn.Linear(8, 4, bias=False)
        >>> model = nn.Sequential(gate)
        >>> with RouterMonitor(model, routers=[RouterSpec(name="0", top_k=2)]) as monitor:
        ...     _ = model(torch.randn(16, 8))
        ...     snap = monitor.collect(step=1)
        >>> snap.counts.sum().item(), snap.tokens.tolist()
        (32, [16])
        >>> row = monitor.layer_frame().iloc[0]
        >>> int(row.step), row.phase, row.layer, int(row.assignments)
        (1, 'train', '0', 32)
    """

    def __init__(
        self,
        model: nn.Module,
        routers: Sequence[str | nn.Module | RouterSpec] | None = None,
        *,
        coactivation: bool | str = "auto",
        capacity_factors: Sequence[float] = (1.0, 1.25),
        history_dir: str | os.PathLike | None = None,
        keep_windows: int | None = None,
        process_group: Any = None,
    ) -> None:
        if any(not (isinstance(cf, (int, float)) and cf > 0) for cf in capacity_factors):
            raise ValueError(f"capacity_factors must be positive numbers, got {capacity_factors!r}")
        if not (isinstance(coactivation, bool) or coactivation == "auto"):
            raise ValueError(f"coactivation={coactivation!r} is not valid; choose True, False or 'auto'")
        self.process_group = process_group
        self.layers, (names, num_experts, top_k), self.pipelined = _discover_agreed(model, routers, process_group)
        row_of = {name: row for row, name in enumerate(names)}
        self.rows: list[int] = [row_of[layer.name] for layer in self.layers]
        auto = coactivation == "auto"
        # Per snapshot row: from the agreed layout alone, so every process packs the same columns.
        self._coactivation = [
            k >= 2 and (coactivation is True or (auto and e <= COACTIVATION_MAX_EXPERTS))
            for e, k in zip(num_experts, top_k)
        ]
        self.layout = Layout(max(num_experts), any(self._coactivation), capacity_factors)
        self.history = History(names, num_experts, top_k, capacity_factors, keep_windows)
        self._model = weakref.ref(model)
        if history_dir is not None:
            self.history.open(history_dir)
        self._windows: dict[str, dict[torch.device, torch.Tensor]] = {}
        self._phase_override: str | None = None
        self._mask_T: torch.Tensor | None = None
        self._mask_by_device: dict[torch.device, torch.Tensor] = {}
        self._mask_mismatch_warned = False
        self._disabled: set[int] = set()
        self._advice = [_advice(layer) for layer in self.layers]
        self._handles = [layer.module.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]

    @property
    def layer_names(self) -> list[str]:
        """Every layer of the snapshots, in the agreed order (this process's :attr:`layers` and, across a process
        group, the other processes' too)."""
        return self.history.layer_names

    # ----------------------------------------------------------------------------------------------- hot path
    def _make_hook(self, index: int):
        layer = self.layers[index]
        row = self.rows[index]
        counterfactual = bool(self.layout.capacity_factors)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            compiling = torch.compiler.is_compiling()
            if index in self._disabled or (not compiling and _in_backward()):
                return
            phase = self._phase_override or ("train" if module.training else "val")
            try:
                # Read per forward where the router's kind and capacity may change between steps (reference).
                kind, dropless = (layer.kind, layer.dropless) if layer.live is None else layer.live(module)
                with torch.no_grad():
                    routing = layer.extract(module, args, output)
                    update = (
                        forward_update
                        if compiling
                        else functools.partial(
                            forward_update, out_F=self._buffer(phase, routing.expert_idx_A.device)[row]
                        )
                    )
                    update_F = update(
                        routing,
                        layer.num_experts,
                        # k from the shapes (A = T * k for token choice): follows a router whose top_k a controller
                        # changes between steps.
                        routing.expert_idx_A.numel() // max(routing.num_tokens, 1),
                        self.layout,
                        mask_T=self._mask_for(routing.num_tokens, routing.expert_idx_A.device),
                        coactivation=self._coactivation[row],
                        counterfactual=counterfactual
                        and dropless
                        and routing.kept_A is None
                        and kind == "token_choice",
                        dropless=dropless,
                        unrouted=kind != "token_choice",
                    )
                    if compiling:
                        # The row form: a compiled graph scales the update by the opaque forward weight.
                        self._buffer(phase, update_F.device)[row].add_(update_F * _forward_weight(update_F))
            except Exception as error:  # noqa: BLE001 - the monitor must never kill the step it watches
                self._disable(index, error)

        return hook

    def _disable(self, index: int, error: Exception) -> None:
        self._disabled.add(index)
        mismatch, otherwise = self._advice[index]
        advice = str(error.width).join(mismatch) if isinstance(error, ExpertCountMismatch) else otherwise
        warnings.warn(
            f"moe_monitor: reading router {self.layers[index].name!r} failed ({type(error).__name__}: {error}); "
            f"this layer is no longer monitored (its statistics are NaN from now on){advice}",
            RuntimeWarning,
            stacklevel=3,
        )

    def _buffer(self, phase: str, device: torch.device) -> torch.Tensor:
        window = self._windows.setdefault(phase, {})
        buffer = window.get(device)
        if buffer is None:
            # A buffer first touched by a validation forward under inference mode (Lightning's default) must still
            # be a normal tensor, or resetting it in collect() would fail outside inference mode.
            with torch.inference_mode(False):
                buffer = self._zeros(device)
            window[device] = buffer
        return buffer

    def _zeros(self, device: torch.device) -> torch.Tensor:
        """An empty ``[L, F]`` window: every agreed layer, this process's rows and the others'."""
        return torch.zeros(len(self.layer_names), self.layout.width, dtype=_buffer_dtype(device), device=device)

    def _mask_for(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        mask_T = self._mask_T
        if mask_T is None:
            return None
        if mask_T.numel() != num_tokens:
            # E.g. the decoder of an encoder-decoder model, whose tokens the encoder's mask does not describe.
            if not self._mask_mismatch_warned:
                self._mask_mismatch_warned = True
                warnings.warn(
                    f"moe_monitor: token mask has {mask_T.numel()} entries but a router saw {num_tokens} tokens; "
                    "such forwards are counted without the mask",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        cached = self._mask_by_device.get(device)
        if cached is None:
            cached = self._mask_by_device[device] = mask_T.to(device, non_blocking=True)
        return cached

    # ------------------------------------------------------------------------------------------- controls
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Sets which tokens of the next forwards count (``None``: all of them), until changed.

        Args:
            mask: bool or 0/1 tensor whose flattening lines up with a router's flattened tokens, e.g. the
                ``attention_mask [B, S]`` of the batch (routers see ``B * S`` tokens). Put it on the model's
                device: a CPU mask is copied to the device at the first forward. A forward whose token count
                differs from ``mask.numel()`` is counted unmasked (with one warning).

        Example:
            >>> monitor = RouterMonitor(nn.Sequential(nn.Linear(4, 2)), routers=[RouterSpec(name="0", top_k=1)])
            >>> monitor.set_token_mask(torch.tensor([[1, 1, 0]]))
            >>> _ = monitor.layers[0].module(torch.randn(3, 4))
            >>> monitor.collect(0).tokens.tolist()
            [2]
        """
        self._mask_by_device = {}
        self._mask_T = None if mask is None else mask.detach().reshape(-1).to(dtype=torch.float32)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Counts every router forward inside the block to phase ``name`` (overrides the train/val default).

        Example:
            >>> monitor = RouterMonitor(nn.Sequential(nn.Linear(4, 2)), routers=[RouterSpec(name="0", top_k=1)])
            >>> with monitor.phase("test"):
            ...     _ = monitor.layers[0].module(torch.randn(3, 4))
            >>> monitor.collect(0, "test").tokens.tolist(), monitor.collect(0, "train").tokens.tolist()
            ([3], [0])
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty string, got {name!r}")
        previous, self._phase_override = self._phase_override, name
        try:
            yield
        finally:
            self._phase_override = previous

    def window_counts(self, phase: str = "train") -> torch.Tensor:
        """Assignments per expert of the open window, ``float64 [L, E]``, on the routers' device, no host sync.

        Local to this process and not reduced (for per-step controllers that act on local counts): the rows of
        layers held by other processes (:attr:`layer_names` beyond :attr:`rows`) are zero. With all routers on one
        device this is a live view of the counters: it is reset to zero by :meth:`collect`.

        Example:
            >>> monitor = RouterMonitor(nn.Sequential(nn.Linear(4, 2)), routers=[RouterSpec(name="0", top_k=1)])
            >>> _ = monitor.layers[0].module(torch.randn(3, 4))
            >>> monitor.window_counts().sum().item()
            3.0
        """
        window = self._windows.get(phase)
        if not window:
            return self._buffer(phase, self._home_device())[:, self.layout.counts]
        buffers = list(window.values())
        if len(buffers) == 1:
            return buffers[0][:, self.layout.counts]
        total = buffers[0][:, self.layout.counts].clone()
        for buffer in buffers[1:]:
            total += buffer[:, self.layout.counts].to(total.device, non_blocking=True)
        return total

    def move_window(self, source: str, into: Sequence[str]) -> None:
        """Adds the open window of phase ``source`` to the open window of each phase of ``into``, then empties it.

        Every counter of a window is a sum, so each phase of ``into`` then holds what it would have counted had the
        forwards of ``source`` gone to it too: e.g. forwards counted per validation domain, moved at the end of
        each validation both into that domain's window and into the whole validation window. Local, no collective,
        no host sync.

        Example:
            >>> monitor = RouterMonitor(nn.Sequential(nn.Linear(4, 2)), routers=[RouterSpec(name="0", top_k=1)])
            >>> with monitor.phase("scratch"):
            ...     _ = monitor.layers[0].module(torch.randn(3, 4))
            >>> _ = monitor.layers[0].module.eval()(torch.randn(2, 4))
            >>> monitor.move_window("scratch", ["val", "val/a"])
            >>> [monitor.collect(0, p).tokens.tolist() for p in ("val", "val/a", "scratch")]
            [[5], [3], [0]]
        """
        for device, buffer in self._windows.get(source, {}).items():
            for phase in into:
                self._buffer(phase, device).add_(buffer)
            buffer.zero_()

    def _home_device(self) -> torch.device:
        # A pipeline stage without routers keeps its (zero) window where its model is, e.g. for NCCL's device.
        module = self.layers[0].module if self.layers else self._model()
        if module is None:
            return torch.device("cpu")
        tensor = next(module.parameters(), None)
        if tensor is None:
            tensor = next(module.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    # ------------------------------------------------------------------------------------------- collect
    def _reduce(self, phase: str) -> torch.Tensor:
        """Sums the phase's window over devices and processes and resets it: ``float64 [L, F]`` on the CPU."""
        buffers = list(self._windows.get(phase, {}).values())
        if buffers:
            total = buffers[0] if len(buffers) == 1 else torch.stack([b.to(buffers[0].device) for b in buffers]).sum(0)
        else:
            device = self._home_device()
            total = self._zeros(device)
        if self._disabled:
            # Reduced with everything else, so that a layer disabled on one process is NaN on every process and
            # decisions taken from the statistics stay the same everywhere.
            total[sorted(self.rows[i] for i in self._disabled), self.layout.scalar("disabled")] = 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend(self.process_group) == "nccl" and total.device.type != "cuda":
                total = total.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(total, group=self.process_group)
        host_LF = total.to("cpu", torch.float64, copy=True)
        for buffer in buffers:
            buffer.zero_()
        return host_LF

    def collect(self, step: int, phase: str = "train") -> Snapshot:
        """Closes ``phase``'s window: reduces it, computes the statistics, appends them to the history, resets it.

        A collective when ``torch.distributed`` is initialised: every process must call it. Layers disabled
        after an extraction error (on any process: the flag is reduced with the counts, so every process returns the
        same snapshot) and windows with no tokens give NaN statistics.

        Args:
            step: the step number recorded with the window.
            phase: which window to close (``"train"``, ``"val"`` or a name given to :meth:`phase`).

        Returns:
            The window's :class:`~moe_monitor.snapshot.Snapshot` (CPU tensors). Its ``extras``:
            ``"assignments"`` ``[L]``; ``"disabled"`` ``[L]``, 1.0 for a layer no longer monitored on some process;
            ``"drop_unknown"`` ``[L]``, assignments of a router with a capacity
            (``dropless=False``) whose adapter did not say which it dropped (``dropped_fraction`` is NaN when > 0;
            ``dropped`` counts only the known drops); ``"counterfactual_drop@<cf>"`` ``[L]``, the fraction of
            assignments a capacity of ``ceil(T / E * k * cf)`` per forward would have dropped (``T`` the forward's
            counted tokens; NaN for routers that have a real capacity, and for expert choice); ``"coactivation"``
            ``[L, E, E]`` (when enabled), entry ``[l, e, f]`` = tokens that chose both ``e`` and ``f``, the diagonal
            being the counts (NaN for top-1 layers).
        """
        layout = self.layout
        host_LF = self._reduce(phase)
        num_experts_L = torch.tensor(self.history.num_experts)
        column = {name: host_LF[:, layout.scalar(name)] for name in layout.scalar_names}
        counts_LE = host_LF[:, layout.counts]
        disabled_L = column["disabled"] > 0
        stat_values = stats.compute(
            counts_LE,
            host_LF[:, layout.prob_sum],
            num_experts_L,
            column["tokens"],
            column["prob_tokens"],
            column["logit_tokens"],
            column["z_sum"],
            column["entropy_sum"],
            column["top1_sum"],
            column["dropped"],
            column["drop_unknown"],
            column["unrouted_tokens"],
            column["skipped"],
        )
        stat_values = {name: torch.where(disabled_L, math.nan, stat_values[name]) for name in STAT_NAMES}
        extras: dict[str, torch.Tensor] = {
            "assignments": counts_LE.sum(dim=1),
            "drop_unknown": column["drop_unknown"],
            "unrouted_tokens": column["unrouted_tokens"],
            "disabled": disabled_L.double(),
        }
        for cf in layout.capacity_factors:
            dropped_L = column[f"cf_dropped@{float(cf)!r}"]
            extras[f"counterfactual_drop@{float(cf)!r}"] = dropped_L / column["cf_assignments"]
        if layout.coactivation:
            e = layout.num_experts
            coact_LEE = host_LF[:, layout.coact].reshape(-1, e, e).clone()
            coact_LEE[~torch.tensor(self._coactivation)] = math.nan
            extras["coactivation"] = coact_LEE
        snapshot = Snapshot(
            step=int(step),
            phase=phase,
            layer_names=list(self.history.layer_names),
            num_experts=list(self.history.num_experts),
            top_k=list(self.history.top_k),
            counts=counts_LE.round().long(),
            tokens=column["tokens"].round().long(),
            dropped=column["dropped"].round().long(),
            nonfinite_tokens=column["nonfinite_tokens"].round().long(),
            stats=stat_values,
            extras=extras,
            kept=(counts_LE - host_LF[:, layout.lost]).round().long(),
            skipped=column["skipped"].round().long(),
        )
        self.history.append(snapshot)
        return snapshot

    # ------------------------------------------------------------------------------------------- history
    def layer_frame(self):
        """The history, one row per (collect, layer); see :meth:`moe_monitor.history.History.layer_frame`.

        Every window when the history is written to files (``history_dir``), else the last ``keep_windows``.
        """
        return self.history.layer_frame()

    def expert_frame(self):
        """The history, one row per (collect, layer, expert); see :meth:`moe_monitor.history.History.expert_frame`."""
        return self.history.expert_frame()

    def save(self, path: str | os.PathLike) -> list[str]:
        """Writes the history into directory ``path``; see :meth:`moe_monitor.history.History.save`."""
        return self.history.save(path)

    def state_dict(self) -> dict[str, Any]:
        """A small checkpoint state; see :meth:`moe_monitor.history.History.state_dict`."""
        return self.history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (the open windows are not part of it).

        Before any ``collect``; with a pointer to history files, :meth:`History.open` continues them (at once when
        the history was opened already, e.g. with ``history_dir``).
        """
        self.history.load_state_dict(state)

    # ------------------------------------------------------------------------------------------- lifetime
    def remove(self) -> None:
        """Removes every hook and flushes the history files (the history stays readable)."""
        self.history.close()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RouterMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        held = "" if len(self.layers) == len(self.layer_names) else f", {len(self.layers)} on this process"
        return f"RouterMonitor({len(self.layer_names)} routers{held}: {self.layer_names[:4]}...)"


LayerRecord = tuple[str, int, int]
"""``(name, num_experts, top_k)`` of one router, as the processes of a group exchange them at construction."""


def agree_layers(
    records: Sequence[Sequence[LayerRecord]], ranks: Sequence[int] | None = None
) -> tuple[list[str], list[int], list[int]]:
    """The one layer layout of a process group: the union of every process's routers, in a deterministic order.

    Processes come in group order, each one's routers in model order; a name already seen is the same layer on
    another process (a data-parallel replica of a pipeline stage) and keeps its first place. So pipeline stages
    ``[0-1]`` and ``[2-3]`` give ``[0, 1, 2, 3]``, and a stage without routers adds nothing.

    Args:
        records: per process of the group, its routers as ``(name, num_experts, top_k)``.
        ranks: the global rank of each process, for messages (default: ``0, 1, ...``).

    Returns:
        ``(names, num_experts, top_k)`` of every layer, in the agreed order (empty when no process has a router).

    Raises:
        ValueError: one name has another expert count or top-k on another process; or two processes share some
            router names but not all (stages whose layers are named alike, e.g. each stage's local ``layers.0``:
            their counts would be summed into one layer).

    Example:
        >>> stage0, stage1 = [("blocks.0", 8, 2), ("blocks.1", 8, 2)], [("blocks.2", 8, 2)]
        >>> agree_layers([stage0, stage1, [], stage0, stage1])[0]  # two data-parallel replicas, one empty stage
        ['blocks.0', 'blocks.1', 'blocks.2']
        >>> try:
        ...     agree_layers([stage0, [("blocks.0", 8, 2)]])
        ... except ValueError as error:
        ...     print(str(error).split(" (")[0])
        processes 0 and 1 both hold router 'blocks.0' but not the same routers
    """
    ranks = list(range(len(records))) if ranks is None else list(ranks)
    first: dict[str, tuple[int, LayerRecord]] = {}  # name -> (position in records, its record there)
    for position, rank_records in enumerate(records):
        names = [name for name, _, _ in rank_records]
        for record in rank_records:
            name = record[0]
            if name not in first:
                first[name] = (position, record)
                continue
            other, seen = first[name]
            if seen[1:] != record[1:]:
                raise ValueError(
                    f"router {name!r} has {seen[1]} experts, top-{seen[2]} on process {ranks[other]} "
                    f"but {record[1]} experts, top-{record[2]} on process {ranks[position]}. One name is one layer on "
                    "every process of the monitor's process group: give layers of different pipeline stages "
                    "different names (their global layer index), or pass a process_group= that holds only "
                    "replicas of one stage."
                )
            other_names = [n for n, _, _ in records[other]]
            if other_names != names:
                raise ValueError(
                    f"processes {ranks[other]} and {ranks[position]} both hold router {name!r} but not "
                    f"the same routers ({other_names[:4]} vs {names[:4]}), so their counts would be summed into "
                    "layers that are not the same. Name each router by its global layer (e.g. keep the blocks in an "
                    "nn.ModuleDict keyed by the global layer index, as torchtitan does) so pipeline stages never "
                    "share a name, or pass a process_group= that holds only replicas of one stage."
                )
    layers = sorted(first.values(), key=lambda item: item[0])
    return [r[0] for _, r in layers], [r[1] for _, r in layers], [r[2] for _, r in layers]


def _group_size(process_group: Any) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _discover_agreed(
    model: nn.Module, routers: Sequence[str | nn.Module | RouterSpec] | None, process_group: Any
) -> tuple[list[RouterLayer], tuple[list[str], list[int], list[int]], bool]:
    """This process's routers, the layout every process of the group agrees on (one ``all_gather_object``), and
    whether some process holds other layers than the whole layout."""
    if _group_size(process_group) <= 1:
        local = discover(model, routers)
        return local, agree_layers([_records(local)]), False
    dist = torch.distributed
    failure: Exception | None = None
    try:
        local = discover(model, routers)
    except Exception as error:  # noqa: BLE001 - the other processes must hear of it, or they wait in the gather
        local, failure = [], error
    # (whether it is "no router here", what it says): a stage without routers is fine, any other error is not.
    report = None
    if failure is not None:
        report = (isinstance(failure, NoRoutersFoundError), f"{type(failure).__name__}: {failure}")
    gathered: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(gathered, (_records(local), report), group=process_group)
    ranks = dist.get_process_group_ranks(process_group if process_group is not None else dist.group.WORLD)
    if failure is not None and not isinstance(failure, NoRoutersFoundError):
        raise failure
    for rank, (_, other) in zip(ranks, gathered):
        if other is not None and not other[0]:
            raise ValueError(
                f"the RouterMonitor setup failed on process {rank} of the process group ({other[1]}); "
                "every process stops here rather than wait for it. Fix the error that process reports."
            )
    layout = agree_layers([records for records, _ in gathered], ranks)
    if not layout[0]:
        # No process of the group has a router: every one raises its own (the same kind of) error.
        assert failure is not None
        raise failure
    return local, layout, any([name for name, _, _ in records] != layout[0] for records, _ in gathered)


def _records(layers: Sequence[RouterLayer]) -> list[LayerRecord]:
    return [(layer.name, layer.num_experts, layer.top_k) for layer in layers]


def _advice(layer: RouterLayer) -> tuple[tuple[str, ...], str]:
    """What to do when reading ``layer`` fails: for an expert count mismatch (parts to join with the width seen),
    and for any other error."""
    mismatch = (
        "; if the router really has ",
        f" experts, register it with RouterSpec(name={layer.path!r}, num_experts=",
        f", top_k={layer.top_k})",
    )
    otherwise = (
        "; if the router's output is not what its adapter expects, register it with your own extraction function: "
        f"RouterSpec(name={layer.path!r}, num_experts={layer.num_experts}, top_k={layer.top_k}, extract=fn), "
        "fn(module, args, output) -> moe_monitor.routing.Routing"
    )
    return mismatch, otherwise


def _buffer_dtype(device: torch.device) -> torch.dtype:
    # float64 counts are exact to 2**53; Apple's MPS has no float64, float32 there is exact to 2**24 per window.
    return torch.float32 if device.type == "mps" else torch.float64

