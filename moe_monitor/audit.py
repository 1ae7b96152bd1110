"""Offline audit: the routing health of a model, measured on a few batches in eval mode with no gradients.

Shape legend: ``L`` router layers, ``E`` experts, ``B`` batch, ``S`` sequence, ``N`` tokens of a text.

:func:`audit` runs batches through a model under a :class:`~moe_monitor.monitor.RouterMonitor`, closes one window
and judges each layer with the thresholds of :class:`~moe_monitor.detect.CollapseDetector` (the same
range-relative load entropy and MaxVio, the same dead-expert test), giving one verdict line per layer.
:func:`audit_saved` loads a saved model first (a Hugging Face ``save_pretrained`` folder, read locally, or a
``moe-monitor train`` checkpoint) and routes the bundled corpus or a text file through it; it is what
``moe-monitor audit MODEL_DIR`` runs.

The package exports the function :func:`audit` under this module's own name, so ``moe_monitor.audit`` may be
found as either (Python sets the package attribute to the module once it is imported); the module is callable
and forwards to the function, so ``moe_monitor.audit(model, batches)`` works whichever it is.

Example:
    >>> import moe_monitor
    >>> from moe_monitor.reference import MoEConfig, MoETransformer
    >>> model = MoETransformer(MoEConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=8,
    ...                                  n_experts=4, top_k=2, d_expert=16))
    >>> report = moe_monitor.audit(model, [torch.randint(0, 32, (4, 8)) for _ in range(3)])
    >>> report.batches, report.layer_frame().tokens.tolist()
    (3, [96, 96])
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import sys
import tempfile
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_monitor.detect import (
    CollapseDetector,
    CollapseEvent,
    achievable_range,
    dead_expert_probability,
    event_frame,
    hot_experts,
)
from moe_monitor.monitor import RouterMonitor
from moe_monitor.snapshot import Snapshot

__all__ = ["audit", "audit_saved", "AuditReport", "LayerVerdict", "AuditInputError", "judge_layer"]

_PHASE = "audit"
_SEVERITY_RANK = {"ok": 0, "info": 1, "warning": 2, "critical": 3}
# Columns of the summary table: (frame column, header, format).
_TABLE: tuple[tuple[str, str, str], ...] = (
    ("tokens", "tokens", "{:.0f}"),
    ("load_entropy", "entropy", "{:.2f}"),
    ("max_violation", "MaxVio", "{:.2f}"),
    ("dead_experts", "dead", "{:.0f}"),
    ("counterfactual_drop@1.0", "drop@1.0", "{:.1%}"),
    ("counterfactual_drop@1.25", "drop@1.25", "{:.1%}"),
    ("top1_confidence", "top-1", "{:.2f}"),
)


class AuditInputError(ValueError):
    """A model or data the audit cannot use; the message says what to pass instead.

    Example:
        >>> try:
        ...     audit(nn.Linear(4, 4), [], max_batches=0)
        ... except AuditInputError as error:
        ...     print(error)
        max_batches=0 must be a positive integer.
    """


@dataclass(frozen=True)
class LayerVerdict:
    """One layer's reading.

    Attributes:
        layer: module path of the router.
        severity: ``"ok"``, ``"warning"`` or ``"critical"``.
        text: one line for a human, e.g. ``"healthy"`` or ``"collapsed onto experts 0, 1 (83 %)"``.
        findings: ``(rule, message)`` pairs behind the text, rules named as in :data:`moe_monitor.detect.RULES`.
        experts: experts involved (the overloaded ones, then the dead ones).

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> verdict = judge_layer(make_snapshot([[900, 80, 10, 10]]), 0)
        >>> verdict.severity, verdict.experts[:1]
        ('critical', (0,))
    """

    layer: str
    severity: str
    text: str
    findings: tuple[tuple[str, str], ...] = ()
    experts: tuple[int, ...] = ()


def judge_layer(snapshot: Snapshot, index: int, detector: CollapseDetector | None = None) -> LayerVerdict:
    """The verdict on layer ``index`` of one window, with ``detector``'s thresholds (its patience is not used:
    an audit is one window).

    Load entropy and MaxVio are judged on the range top-``k`` routing over ``E`` experts can reach
    (:func:`~moe_monitor.detect.achievable_range`); an expert is called dead only when a fair-share expert would
    have received no assignment with probability below ``dead_expert_p``
    (:func:`~moe_monitor.detect.dead_expert_probability`).

    Example:
        >>> from moe_monitor.detect import make_snapshot
        >>> judge_layer(make_snapshot([[900, 80, 10, 10]]), 0).text
        'collapsed onto expert 0 (90 %)'
        >>> judge_layer(make_snapshot([[260, 240, 250, 250]]), 0).text
        'healthy'
        >>> judge_layer(make_snapshot([[340, 330, 330, 0]]), 0).text
        '1 dead expert (3)'
    """
    detector = detector or CollapseDetector()
    layer = snapshot.layer_names[index]
    num_experts = int(snapshot.num_experts[index])
    top_k = max(1, int(snapshot.top_k[index]))
    counts_E = snapshot.counts[index, :num_experts].double()
    assignments = float(counts_E.sum())
    stat = {name: float(values[index]) for name, values in snapshot.stats.items()}
    nonfinite = int(snapshot.nonfinite_tokens[index]) if snapshot.nonfinite_tokens.numel() else 0
    if math.isnan(stat.get("load_entropy", 0.0)) and assignments > 0:
        return LayerVerdict(layer, "warning", "not monitored (reading the router failed; see the warning)")
    if assignments <= 0:
        return LayerVerdict(layer, "warning", "no tokens routed: nothing to judge")
    loads = (counts_E / assignments).tolist()
    hot = hot_experts(loads, num_experts)
    findings: list[tuple[str, str, str]] = []  # (rule, severity, text)

    if detector.nonfinite and nonfinite > 0:
        findings.append(("nonfinite_logits", "critical", f"{nonfinite} tokens with NaN/Inf router logits"))
    floor, ceiling = achievable_range(num_experts, top_k)
    entropy_n = (stat["load_entropy"] - floor) / (1 - floor) if floor < 1 else math.nan
    share = sum(loads[e] for e in hot)
    names = ", ".join(str(e) for e in hot)
    onto = f"expert{'s' if len(hot) > 1 else ''} {names} ({share:.0%})".replace("%)", " %)")
    if detector.min_load_entropy is not None and entropy_n < detector.min_load_entropy:
        findings.append(("load_entropy", "critical", f"collapsed onto {onto}"))
    elif (
        detector.max_violation is not None and ceiling > 0 and stat["max_violation"] / ceiling > detector.max_violation
    ):
        findings.append(
            ("max_violation", "warning", f"imbalanced: expert {hot[0]} takes {loads[hot[0]] * num_experts:.1f}x "
             "its fair share")
        )  # fmt: skip
    dead: tuple[int, ...] = ()
    if detector.dead_expert_p is not None and dead_expert_probability(num_experts, int(assignments)) < (
        detector.dead_expert_p
    ):
        dead = tuple(e for e in range(num_experts) if counts_E[e] == 0)
        if dead:
            severity = "critical" if len(dead) >= num_experts / 2 else "warning"
            listed = ", ".join(str(e) for e in dead[:8]) + (", ..." if len(dead) > 8 else "")
            findings.append(
                ("dead_experts", severity, f"{len(dead)} dead expert{'s' if len(dead) > 1 else ''} ({listed})")
            )
    dropped = stat.get("dropped_fraction", math.nan)
    if detector.max_dropped_fraction is not None and dropped > detector.max_dropped_fraction:
        findings.append(("dropped_fraction", "warning", f"{dropped:.0%} of assignments dropped for capacity"))
    confidence = stat.get("top1_confidence", math.nan)
    if (
        detector.saturation_confidence is not None
        and confidence >= detector.saturation_confidence
        and entropy_n < detector.saturation_load_entropy
    ):
        findings.append(("saturation", "warning", f"saturated router (top-1 probability {confidence:.2f})"))
    if not findings:
        return LayerVerdict(layer, "ok", "healthy")
    severity = max((f[1] for f in findings), key=_SEVERITY_RANK.__getitem__)
    return LayerVerdict(
        layer,
        severity,
        "; ".join(f[2] for f in findings),
        tuple((rule, text) for rule, _, text in findings),
        tuple(dict.fromkeys((*hot, *dead))) if any(f[0] != "saturation" for f in findings) else hot,
    )


class AuditReport:
    """The routing health of every router layer over the audited batches.

    Attributes:
        snapshot: the audit's one window (:class:`~moe_monitor.snapshot.Snapshot`, phase ``"audit"``).
        verdicts: one :class:`LayerVerdict` per layer, in model order.
        batches: batches run.
        notes: how the data was made (e.g. bytes mapped modulo the vocabulary), printed with the table.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4, bias=False))
        >>> from moe_monitor.adapters import RouterSpec
        >>> report = audit(model, [torch.randn(64, 8)], routers=[RouterSpec(name="0", top_k=1)])
        >>> report.batches, int(report.layer_frame().tokens[0]), report.verdicts[0].layer
        (1, 64, '0')
    """

    def __init__(
        self,
        monitor: RouterMonitor,
        snapshot: Snapshot,
        verdicts: Sequence[LayerVerdict],
        batches: int,
        notes: Sequence[str] = (),
    ) -> None:
        self._monitor = monitor
        self.snapshot = snapshot
        self.verdicts = list(verdicts)
        self.batches = batches
        self.notes = list(notes)

    @property
    def healthy(self) -> bool:
        """Whether every layer reads healthy."""
        return all(v.severity == "ok" for v in self.verdicts)

    def layer_frame(self):  # -> pandas.DataFrame
        """One row per layer: the columns of :meth:`RouterMonitor.layer_frame` (with ``counterfactual_drop@1.0`` /
        ``@1.25``: what a capacity factor of 1.0 / 1.25 would drop), then ``top_coactivation`` (the most frequent
        expert pair's share of the tokens, NaN for top-1 layers), ``severity`` and ``verdict``."""
        frame = self._monitor.layer_frame()
        frame["top_coactivation"] = [self._top_pair(i)[1] for i in range(len(self.verdicts))]
        frame["severity"] = [v.severity for v in self.verdicts]
        frame["verdict"] = [v.text for v in self.verdicts]
        return frame

    def expert_frame(self):  # -> pandas.DataFrame
        """One row per (layer, expert): the columns of :meth:`RouterMonitor.expert_frame`, then ``fair_share``
        (``load * E``: 1 is a fair share) and ``dead`` (no assignment)."""
        frame = self._monitor.expert_frame()
        experts_L = frame.groupby("layer_index")["expert"].transform("count")
        frame["fair_share"] = frame["load"] * experts_L
        frame["dead"] = frame["count"] == 0
        return frame

    def coactivation(self, layer: int | str):  # -> pandas.DataFrame
        """Tokens that chose both experts ``e`` and ``f`` (rows ``e``, columns ``f``; the diagonal is the count) of
        one layer, by index or module path; NaN for a top-1 layer."""
        import pandas as pd

        index = layer if isinstance(layer, int) else self.snapshot.layer_names.index(layer)
        num_experts = int(self.snapshot.num_experts[index])
        coact_LEE = self.snapshot.extras.get("coactivation")
        if coact_LEE is None:
            values = torch.full((num_experts, num_experts), math.nan)
        else:
            values = coact_LEE[index, :num_experts, :num_experts]
        return pd.DataFrame(values.numpy(), index=range(num_experts), columns=range(num_experts))

    def _top_pair(self, index: int) -> tuple[tuple[int, int] | None, float]:
        coact_LEE = self.snapshot.extras.get("coactivation")
        tokens = float(self.snapshot.tokens[index])
        num_experts = int(self.snapshot.num_experts[index])
        if coact_LEE is None or tokens <= 0 or num_experts < 2:
            return None, math.nan
        pairs_EE = coact_LEE[index, :num_experts, :num_experts].clone()
        if torch.isnan(pairs_EE).any():
            return None, math.nan
        pairs_EE.fill_diagonal_(-1)
        flat = int(pairs_EE.argmax())
        return (flat // num_experts, flat % num_experts), float(pairs_EE.flatten()[flat]) / tokens

    def event_frame(self):  # -> pandas.DataFrame
        """The findings as events (columns :data:`moe_monitor.detect.EVENT_COLUMNS`), one per (layer, finding)."""
        return event_frame(
            CollapseEvent(
                step=self.snapshot.step,
                phase=_PHASE,
                layer=verdict.layer,
                rule=rule,
                value=math.nan,
                threshold=math.nan,
                severity=verdict.severity if verdict.severity != "ok" else "info",
                message=f"[audit] {verdict.layer}: {text}",
                experts=tuple(verdict.experts),
            )
            for verdict in self.verdicts
            for rule, text in verdict.findings
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``layers.csv``, ``experts.csv`` and ``events.csv`` (the history files of a training run) into
        directory ``path``; returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.layer_frame().to_csv(path / "layers.csv", index=False)
        self._monitor.expert_frame().to_csv(path / "experts.csv", index=False)
        self.event_frame().to_csv(path / "events.csv", index=False)
        return path

    def to_html(self, path: str | os.PathLike, name: str = "audit") -> Path:
        """Writes the HTML report of a training run (``moe_monitor.report``) for this audit to ``path``."""
        from moe_monitor.report import write_report

        with tempfile.TemporaryDirectory() as tmp:
            history = self.save(Path(tmp) / name)
            return Path(write_report(history, Path(path)))

    def __str__(self) -> str:
        frame = self.layer_frame()
        tokens = int(self.snapshot.tokens.max()) if len(self.verdicts) else 0
        lines = [f"Routing audit: {self.batches} batches, {tokens} tokens per layer"]
        lines += [f"  note: {note}" for note in self.notes]
        header = ["layer", "E", "k", *(title for _, title, _ in _TABLE), "verdict"]
        rows = []
        for i, verdict in enumerate(self.verdicts):
            row = frame.iloc[i]
            cells = [verdict.layer, str(int(row.num_experts)), str(int(row.top_k))]
            for column, _, fmt in _TABLE:
                value = float(row[column]) if column in row else math.nan
                cells.append("-" if math.isnan(value) else fmt.format(value))
            rows.append([*cells, verdict.text])
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
        for r in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
        bad = sum(v.severity != "ok" for v in self.verdicts)
        lines.append(f"{len(self.verdicts) - bad} of {len(self.verdicts)} layers healthy.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"AuditReport({len(self.verdicts)} layers, {self.batches} batches, healthy={self.healthy})"


def audit(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int = 200,
    *,
    routers: Sequence[Any] | None = None,
    detector: CollapseDetector | None = None,
    capacity_factors: Sequence[float] = (1.0, 1.25),
    notes: Sequence[str] = (),
) -> AuditReport:
    """Runs up to ``max_batches`` batches through ``model`` in eval mode with no gradients and reports the routing
    health of every router layer. The model's training flags are restored afterwards and no hook stays behind.

    Args:
        model: the model; its routers are found as by :class:`~moe_monitor.monitor.RouterMonitor`.
        batches: token-id tensors ``[B, S]`` (or any input the model takes as its first argument), or mappings
            with ``input_ids`` and optionally ``attention_mask`` (padding, ``0``, is left out of the counts; the
            mask is also passed to a model whose ``forward`` takes one).
        max_batches: at most this many batches are run.
        routers: manual router registration, as for :class:`~moe_monitor.monitor.RouterMonitor`.
        detector: whose thresholds judge each layer (default: :class:`~moe_monitor.detect.CollapseDetector`'s).
        capacity_factors: capacity factors of the counterfactual drop (``counterfactual_drop@<cf>`` columns).
        notes: lines printed with the report (how the data was made).

    Returns:
        An :class:`AuditReport`.

    Raises:
        AuditInputError: ``max_batches`` is not positive, or ``batches`` is empty.
        NoRoutersFoundError: the model has no recognisable router (the message says how to register one).

    Example:
        >>> from moe_monitor.reference import MoEConfig, MoETransformer
        >>> model = MoETransformer(MoEConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, seq_len=8,
        ...                                  n_experts=4, top_k=2, d_expert=16))
        >>> report = audit(model, [torch.randint(0, 32, (4, 8))])
        >>> int(report.layer_frame().assignments[0]), model.training
        (64, True)
    """
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise AuditInputError(f"max_batches={max_batches!r} must be a positive integer.")
    monitor = RouterMonitor(model, routers=routers, capacity_factors=capacity_factors)
    training = {module: module.training for module in model.modules()}
    device = _device_of(model)
    takes_mask = _takes_attention_mask(model)
    run = 0
    try:
        model.eval()
        with torch.no_grad(), monitor.phase(_PHASE):
            for batch in batches:
                if run >= max_batches:
                    break
                inputs, mask = _unpack(batch, device)
                monitor.set_token_mask(mask)
                if mask is not None and takes_mask:
                    model(inputs, attention_mask=mask)
                else:
                    model(inputs)
                run += 1
        monitor.set_token_mask(None)
        if run == 0:
            raise AuditInputError("batches is empty: pass at least one batch of token ids.")
        snapshot = monitor.collect(step=run, phase=_PHASE)
    finally:
        monitor.remove()
        for module, flag in training.items():
            module.training = flag
    judge = copy.deepcopy(detector) if detector is not None else CollapseDetector()
    verdicts = [judge_layer(snapshot, i, judge) for i in range(len(monitor.layers))]
    return AuditReport(monitor, snapshot, verdicts, run, notes)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _unpack(batch: Any, device: torch.device) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise AuditInputError(f"a batch has keys {sorted(batch)} but no 'input_ids'; pass token ids there.")
        mask = batch.get("attention_mask")
        mask = mask.to(device) if isinstance(mask, torch.Tensor) else None
        return batch["input_ids"].to(device), mask
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return (batch.to(device) if isinstance(batch, torch.Tensor) else batch), None


# ----------------------------------------------------------------------------------------------- saved models
def audit_saved(
    path: str | os.PathLike,
    data: str | os.PathLike | None = None,
    max_batches: int = 20,
    batch_size: int = 8,
    seq_len: int | None = None,
    seed: int = 0,
) -> AuditReport:
    """Loads a saved model and audits it on the bundled corpus (default) or on the text file ``data``.

    Args:
        path: a Hugging Face ``save_pretrained`` folder (loaded with ``AutoModelForCausalLM.from_pretrained``,
            local files only), a ``.ckpt`` of ``moe-monitor train``, or a run folder holding
            ``checkpoints/last.ckpt``.
        data: a UTF-8 text file; ``None`` routes held-out windows of the bundled corpus (English and Python).
        max_batches: batches to run.
        batch_size: sequences per batch.
        seq_len: tokens per sequence; default the model's context, at most 256.
        seed: seed of the window offsets.

    Text becomes tokens with the tokenizer saved beside a Hugging Face model; without one (and for the
    byte-level reference model) each byte is a token, taken modulo the vocabulary when it is smaller than 256
    (the report says so).

    Raises:
        AuditInputError: the path holds no model this function can load, or the text is too short.

    Example:
        >>> try:
        ...     audit_saved("no/such/run")
        ... except AuditInputError as error:
        ...     print(str(error)[:60])
        no/such/run is neither a Hugging Face model folder (no confi
    """
    path = Path(path)
    model, tokenizer, context, vocab, kind = _load_model(path)
    seq_len = min(context, 256) if seq_len is None else seq_len
    notes = [f"model: {kind} from {path}"]
    texts, source = _read_texts(data)
    notes.append(f"data: {source}")
    if tokenizer is not None:
        ids = [torch.tensor(tokenizer(text.decode("utf-8", errors="replace"))["input_ids"]) for text in texts]
        notes.append(f"tokenized with the tokenizer saved in {path}")
    else:
        ids = [torch.frombuffer(bytearray(text), dtype=torch.uint8).long() for text in texts]
        if vocab < 256:
            ids = [ids_N % vocab for ids_N in ids]
            notes.append(f"no tokenizer: bytes mapped modulo the vocabulary ({vocab}), so tokens are not real words")
        elif kind.startswith("Hugging Face"):
            notes.append("no tokenizer saved with the model: each byte is one token id")
    batches = list(_batches(ids, seq_len, batch_size, max_batches, seed))
    return audit(model, batches, max_batches=max_batches, notes=notes)


def _load_model(path: Path) -> tuple[nn.Module, Any, int, int, str]:
    """``(model, tokenizer or None, context length, vocabulary size, description)``."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f'{path} is a Hugging Face model folder; reading it needs transformers: pip install "moe-monitor[hf]"'
            ) from None
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = None
        if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = model.config
        context = int(getattr(config, "max_position_embeddings", 256) or 256)
        return model, tokenizer, context, int(config.vocab_size), f"Hugging Face {type(model).__name__}"
    ckpt = _checkpoint_in(path)
    from moe_monitor.reference import ReferenceLM

    try:
        lm = ReferenceLM.load_from_checkpoint(ckpt, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise AuditInputError(
            f"{ckpt} is not a checkpoint of moe-monitor train ({type(error).__name__}: {error}); pass a "
            "save_pretrained folder of a Hugging Face model, or a .ckpt written by moe-monitor train."
        ) from None
    config = lm.config
    return lm.model, None, config.seq_len, config.vocab_size, f"reference MoETransformer ({ckpt.name})"


def _checkpoint_in(path: Path) -> Path:
    if path.is_file() and path.suffix == ".ckpt":
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(path.glob("checkpoints/*.ckpt")) + sorted(path.glob("*.ckpt"))
        if found:
            return found[-1]
    raise AuditInputError(
        f"{path} is neither a Hugging Face model folder (no config.json) nor a .ckpt file or a run folder with "
        "checkpoints/last.ckpt; pass one of those (e.g. runs/moe/version_0)."
    )


def _read_texts(data: str | os.PathLike | None) -> tuple[list[bytes], str]:
    if data is None:
        from moe_monitor.reference.data import DOMAINS, corpus_splits

        _, val_texts = corpus_splits()
        return [bytes(t.numpy().tobytes()) for t in val_texts], f"bundled corpus, held-out split ({', '.join(DOMAINS)})"
    path = Path(data)
    if not path.is_file():
        raise AuditInputError(f"--data {path}: no such file; pass a UTF-8 text file, or leave --data out.")
    return [path.read_bytes()], f"{path}"


def _batches(
    ids: Sequence[torch.Tensor], seq_len: int, batch_size: int, max_batches: int, seed: int
) -> Iterable[dict[str, torch.Tensor]]:
    """``max_batches`` batches of windows at seeded random offsets, the texts taken in turn; a text shorter than
    ``seq_len`` becomes one padded sequence (its ``attention_mask`` leaves the padding out)."""
    generator = torch.Generator().manual_seed(seed)
    if not any(t.numel() for t in ids):
        raise AuditInputError("the text is empty; pass a file with some text in it.")
    windows: list[tuple[torch.Tensor, int]] = []
    for i in range(max_batches * batch_size):
        text_N = ids[i % len(ids)]
        if text_N.numel() == 0:
            text_N = next(t for t in ids if t.numel())
        if text_N.numel() <= seq_len:
            windows.append((text_N, text_N.numel()))
            continue
        offset = int(torch.randint(text_N.numel() - seq_len + 1, (1,), generator=generator))
        windows.append((text_N[offset : offset + seq_len], seq_len))
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(n for _, n in chunk)
        input_ids_BS = torch.zeros(len(chunk), width, dtype=torch.long)
        mask_BS = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (tokens, n) in enumerate(chunk):
            input_ids_BS[row, :n], mask_BS[row, :n] = tokens, 1
        yield {"input_ids": input_ids_BS, "attention_mask": mask_BS}


class _CallableModule(types.ModuleType):
    """This module, callable as its function :func:`audit` (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> AuditReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
