"""The history of closed windows: a bounded tail in memory, the full history in columnar files beside the run.

Shape legend: ``L`` monitored router layers, ``E`` experts (the largest of any layer), ``K`` value columns of a
layer row, ``N`` windows, ``R`` rows.

Memory and checkpoints do not grow with the run (SPEC §4). In memory the :class:`History` keeps the last
``keep_windows`` windows (a window is its ``int64 [L, E]`` counts and a ``float64 [L, K]`` row of values per layer);
the default fills a budget of :data:`MEMORY_BUDGET` bytes (at 94 layers x 128 experts, 37 windows). With a
directory open (:meth:`History.open`) every window also goes to files, as the run goes:

- ``layers.csv``: one row per (window, layer), the columns of :data:`LAYER_COLUMNS` (then one
  ``counterfactual_drop@<cf>`` per capacity factor); appended at every window, so a person can read (``tail``) it
  while the run goes. A row is about 200 bytes: 94 layers for 10,000 windows are under 200 MB.
- ``layers.parquet/`` and ``experts.parquet/`` (when pyarrow is installed): the same layer rows and one row per
  (window, layer, expert) with :data:`EXPERT_COLUMNS`, as part files ``part-<first window>.parquet`` of about
  :data:`PART_ROWS` expert rows each, zstd-compressed and dictionary-encoded. Each directory reads back as one data
  set (``pandas.read_parquet(".../experts.parquet")``), and :func:`moe_monitor.report.load_run` finds them. Part
  files rather than row groups appended to one file: a Parquet file's footer is written last, so an appended file is
  unreadable until closed and lost whole on a crash, while a finished part file stays readable and a resume drops
  whole files. Expert rows are columnar only: 94 x 128 experts is 12,032 rows per window, 120 million rows after
  10,000 windows, which as CSV would be gigabytes.
- ``experts.csv``: only without pyarrow, appended with each part.

Without a directory the history is the in-memory tail only: :meth:`History.layer_frame` and
:meth:`History.expert_frame` return the windows still kept, and the first window evicted warns once (saying how to
keep everything). With a directory they read the full history back from the files.

Checkpoints: :meth:`History.state_dict` is a pointer when a directory is open (the directory, the number of windows
and the CSV byte sizes written so far: a few hundred bytes), and the kept tail otherwise (bounded by
``keep_windows``). Resuming from a pointer truncates the files to what the checkpoint had seen, dropping the windows
written after it (the resumed run replays those steps), so the files carry on without duplicates or gaps.
"""

from __future__ import annotations

import collections
import csv
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_monitor.snapshot import STAT_NAMES, Snapshot

__all__ = ["History", "LAYER_COLUMNS", "EXPERT_COLUMNS", "MEMORY_BUDGET", "PART_ROWS"]

LAYER_COLUMNS: tuple[str, ...] = (
    "step",
    "phase",
    "layer",
    "layer_index",
    "num_experts",
    "top_k",
    "tokens",
    "assignments",
    "dropped",
    *STAT_NAMES,
    "nonfinite_tokens",
    "unrouted_tokens",
    "skipped",
)
"""Columns of :meth:`History.layer_frame`, followed by one ``counterfactual_drop@<cf>`` per capacity factor."""

EXPERT_COLUMNS: tuple[str, ...] = ("step", "phase", "layer", "layer_index", "expert", "count", "kept", "load")
"""Columns of :meth:`History.expert_frame`."""

MEMORY_BUDGET = 4 * 2**20
"""Bytes of windows kept in memory when ``keep_windows`` is not given (at least 16 windows are kept)."""

PART_ROWS = 2**18
"""Expert rows per Parquet part file (a part holds at least one window and at most ``keep_windows``)."""

STATE_VERSION = 2

_MIN_KEEP = 16
# unrouted_tokens and skipped stay float: NaN in windows restored from states written before they were counted.
_INT_VALUES = ("tokens", "assignments", "dropped", "nonfinite_tokens")
_FILES = ("layers.csv", "experts.csv", "layers.parquet", "experts.parquet")


@dataclass(frozen=True)
class _Window:
    step: int
    phase: str
    counts_LE: np.ndarray  # int64
    kept_LE: np.ndarray  # int64, the assignments each expert ran (counts less the dropped and skipped ones)
    values_LK: np.ndarray  # float64, columns History._value_columns


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


class History:
    """The windows closed by a :class:`~moe_monitor.monitor.RouterMonitor`: a bounded tail in memory, all in files.

    Args:
        layer_names: module path of each router, in model order.
        num_experts: experts of each layer.
        top_k: experts per token of each layer.
        capacity_factors: capacity factors of the ``counterfactual_drop@<cf>`` columns.
        keep_windows: windows kept in memory; ``None`` keeps as many as fit in :data:`MEMORY_BUDGET` bytes (at least
            16).

    Raises:
        ValueError: ``keep_windows`` is not a positive integer.

    Example:
        >>> import tempfile
        >>> history = History(["r"], num_experts=[2], top_k=[1], keep_windows=2)
        >>> history.open(tempfile.mkdtemp())
        >>> for step in (1, 2, 3):
        ...     history.append(Snapshot(step=step, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
        ...         counts=torch.tensor([[step, 1]]), tokens=torch.tensor([step + 1]), dropped=torch.tensor([0]),
        ...         nonfinite_tokens=torch.tensor([0]), stats={}))
        >>> len(history), history.layer_frame().step.tolist()  # three windows, read back from the files
        (3, [1, 2, 3])
        >>> history.expert_frame()["count"].tolist()
        [1, 1, 2, 1, 3, 1]
        >>> sorted(history.state_dict()["files"])
        ['layers.csv']
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        num_experts: Sequence[int],
        top_k: Sequence[int],
        capacity_factors: Sequence[float] = (),
        keep_windows: int | None = None,
    ) -> None:
        self.layer_names = list(layer_names)
        self.num_experts = [int(e) for e in num_experts]
        self.top_k = [int(k) for k in top_k]
        self.cf_columns = [f"counterfactual_drop@{float(cf)!r}" for cf in capacity_factors]
        self._value_columns = (
            "tokens",
            "assignments",
            "dropped",
            *STAT_NAMES,
            "nonfinite_tokens",
            "unrouted_tokens",
            "skipped",
            *self.cf_columns,
        )
        width = max(self.num_experts)
        window_bytes = 8 * len(self.layer_names) * (2 * width + len(self._value_columns))
        if keep_windows is None:
            keep_windows = max(_MIN_KEEP, MEMORY_BUDGET // window_bytes)
        if isinstance(keep_windows, bool) or not isinstance(keep_windows, int) or keep_windows < 1:
            raise ValueError(f"keep_windows={keep_windows!r} is not valid; choose a positive integer or None")
        self.keep_windows = keep_windows
        # Windows per part file: about PART_ROWS expert rows, and never more than the tail holds (a window must be
        # written before it is evicted).
        self._part_windows = max(1, min(keep_windows, PART_ROWS // max(1, sum(self.num_experts))))
        self._own_LE = np.arange(width) < np.asarray(self.num_experts)[:, None]
        self._recent: collections.deque[_Window] = collections.deque(maxlen=keep_windows)
        self._total = 0  # windows appended since the start of the run (restored ones included)
        self._written = 0  # windows whose part files (or experts.csv rows) are written
        self._directory: Path | None = None
        self._pointer: dict[str, Any] | None = None  # a restored pointer not yet applied by open()
        self._evicted_warned = False
        self._broken = False
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    # ------------------------------------------------------------------------------------------------ writing
    def __len__(self) -> int:
        return self._total

    @property
    def directory(self) -> Path | None:
        """The directory the history is written to, or ``None`` (in memory only)."""
        return self._directory

    def append(self, snapshot: Snapshot) -> None:
        """Adds one closed window (a :class:`~moe_monitor.snapshot.Snapshot` of these layers)."""
        values_LK = np.empty((len(self.layer_names), len(self._value_columns)), dtype=np.float64)
        sources = {
            "tokens": snapshot.tokens,
            "assignments": snapshot.counts.sum(dim=1),
            "dropped": snapshot.dropped,
            "nonfinite_tokens": snapshot.nonfinite_tokens,
            "skipped": snapshot.skipped,
            **snapshot.stats,
            **{name: value for name, value in snapshot.extras.items() if value.dim() == 1},
        }
        for k, name in enumerate(self._value_columns):
            value = sources.get(name)
            values_LK[:, k] = np.nan if value is None else value.double().numpy()
        counts_LE = snapshot.counts.numpy().astype(np.int64, copy=True)
        kept_LE = counts_LE if snapshot.kept is snapshot.counts else snapshot.kept.numpy().astype(np.int64, copy=True)
        in_memory_only = self._directory is None or self._broken
        if len(self._recent) == self.keep_windows and in_memory_only and not self._evicted_warned:
            self._evicted_warned = True
            warnings.warn(
                f"moe_monitor: the in-memory history keeps the last {self.keep_windows} windows and now drops the "
                f"oldest (step {self._recent[0].step}), so layer_frame() / expert_frame() no longer hold the whole "
                "run; to keep every window, write the history to files: RouterMonitor(..., history_dir=DIR) or "
                "monitor.history.open(DIR) (or raise keep_windows)",
                RuntimeWarning,
                stacklevel=3,
            )
        self._recent.append(_Window(int(snapshot.step), str(snapshot.phase), counts_LE, kept_LE, values_LK))
        self._total += 1
        if self._directory is not None:
            self._guard(self._write_layers_csv, [self._recent[-1]])
            if self._total - self._written >= self._part_windows:
                self.flush(wait=False)

    def open(self, directory: str | os.PathLike | None = None, resume_step: int | None = None) -> None:
        """Writes the history into ``directory`` from now on (the windows still in memory first).

        Call it on one process only (rank zero). Resuming, either restore the checkpoint first
        (:meth:`load_state_dict`, then ``open``): the files are continued where the checkpoint left them, copied
        over first when ``directory`` is not the checkpoint's; or pass ``resume_step``: the files already in
        ``directory`` are continued, without their rows of later steps.

        Args:
            directory: where to write; ``None`` continues the directory of the restored checkpoint.
            resume_step: continue the history files in ``directory``, dropping the rows with a later step.

        Raises:
            FileExistsError: ``directory`` holds the history files of another run, and neither a checkpoint was
                restored nor ``resume_step`` given.
            ValueError: no ``directory`` and no restored checkpoint that names one, or a directory is open already.
        """
        if self._directory is not None:
            raise ValueError(f"the history is already written to {self._directory}; open it once")
        pointer = self._pointer
        if directory is None:
            if pointer is None or pointer.get("directory") is None:
                raise ValueError(
                    "open() needs a directory: no restored checkpoint names one (call load_state_dict first, or "
                    "pass the directory)"
                )
            directory = pointer["directory"]
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _has_pyarrow()  # imports pyarrow now (a second), not at the first part file in the middle of the run
        existing = [name for name in _FILES if (path / name).exists()]
        if pointer is not None and pointer.get("directory") is not None:
            source = Path(pointer["directory"])
            if source.resolve() != path.resolve() and existing:
                raise FileExistsError(self._exists_message(path, existing))
            self._continue_pointer(source, path, pointer)
        elif resume_step is not None:
            self._continue_step(path, int(resume_step))
        elif existing:
            raise FileExistsError(self._exists_message(path, existing))
        else:
            self._written = self._total - len(self._recent)
        self._directory, self._pointer = path, None
        recent = [w for i, w in self._indexed() if i >= self._written]
        self._guard(self._write_layers_csv, recent)
        self.flush()

    def recent_only(self) -> None:
        """Keeps only the recent windows on purpose, with no warning when the oldest go: for the processes of a
        distributed run other than the one that writes the files (:meth:`open` on rank zero).

        Example:
            >>> history = History(["r"], num_experts=[2], top_k=[1], keep_windows=1)
            >>> history.recent_only()
            >>> for step in (1, 2):
            ...     history.append(Snapshot(step=step, phase="train", layer_names=["r"], num_experts=[2], top_k=[1],
            ...         counts=torch.tensor([[1, 1]]), tokens=torch.tensor([2]), dropped=torch.tensor([0]),
            ...         nonfinite_tokens=torch.tensor([0]), stats={}))
            >>> history.layer_frame().step.tolist()
            [2]
        """
        self._evicted_warned = True

    def flush(self, wait: bool = True) -> None:
        """Writes the windows not yet in part files (it runs by itself every few windows and at checkpoints).

        Args:
            wait: return once the files are written; ``False`` (the flush every few windows) hands the encoding to a
                writer thread and returns at once (one part in flight at most, so memory stays bounded).
        """
        if self._directory is None:
            return
        if self._written < self._total and not self._broken:
            # The list keeps the windows alive when the tail evicts them; a window's arrays are never changed.
            windows = [w for i, w in self._indexed() if i >= self._written]
            self._wait()
            if not self._broken:
                first, self._written = self._written, self._total
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe_monitor-history")
                self._pending = self._writer.submit(self._write_part, first, windows)
        if wait:
            self._wait()

    def close(self) -> None:
        """Flushes the files and waits for them (the history stays readable)."""
        self.flush()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._guard(pending.result)

    def _guard(self, fn, *args) -> bool:
        # The monitor must never stop the run it watches: a full disk warns once and the history stays in memory.
        if self._broken:
            return False
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - a full disk, or an Arrow error in the writer thread
            self._broken = True
            warnings.warn(
                f"moe_monitor: writing the history to {self._directory} failed ({type(error).__name__}: {error}); "
                "training goes on and the "
                f"history is kept in memory only from here on (its last {self.keep_windows} windows): free space or "
                "open another directory with monitor.history.open(DIR) in the next run",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def _indexed(self):
        first = self._total - len(self._recent)
        return ((first + i, window) for i, window in enumerate(self._recent))

    def _write_layers_csv(self, windows: list[_Window]) -> None:
        if not windows:
            return
        _append_csv(self._directory / "layers.csv", self._layer_columns(windows))

    def _write_part(self, first: int, windows: list[_Window]) -> None:
        """Writes one part (in the writer thread: it reads only the windows given and fixed attributes)."""
        name = f"part-{first:09d}"
        if _has_pyarrow():
            for stem, columns in (("layers", self._layer_columns(windows)), ("experts", self._expert_columns(windows))):
                _write_parquet(columns, self._directory / f"{stem}.parquet" / f"{name}.parquet")
        else:
            _append_csv(self._directory / "experts.csv", self._expert_columns(windows))

    # ------------------------------------------------------------------------------------------------ reading
    def layer_frame(self):
        """One row per (window, layer): every window when a directory is open, else the windows still in memory.

        Columns: :data:`LAYER_COLUMNS` (``layer`` is the module path; ``layer_index`` its position in model order),
        then ``counterfactual_drop@<cf>`` per capacity factor (NaN for routers with a real capacity).
        """
        self._wait()
        if self._directory is None or self._broken:
            return self._layer_rows(list(self._recent))
        pending = [w for i, w in self._indexed() if i >= self._written]
        if _has_pyarrow():
            parts = [*_read_parts(self._directory, "layers"), self._layer_rows(pending)]
            return _cast_layers(_concat(parts), self.cf_columns)
        return _cast_layers(_read_csv(self._directory / "layers.csv"), self.cf_columns)

    def expert_frame(self):
        """One row per (window, layer, expert of that layer); the same windows as :meth:`layer_frame`.

        Columns: :data:`EXPERT_COLUMNS`; ``load = count / assignments`` of the layer (NaN for an empty window).
        """
        self._wait()
        if self._directory is None or self._broken:
            return self._expert_rows(list(self._recent))
        pending = self._expert_rows([w for i, w in self._indexed() if i >= self._written])
        if _has_pyarrow():
            return _cast_experts(_concat([*_read_parts(self._directory, "experts"), pending]))
        path = self._directory / "experts.csv"
        return _cast_experts(_concat([_read_csv(path) if path.exists() else pending.iloc[:0], pending]))

    def _layer_rows(self, windows: list[_Window]):
        return _cast_layers(_frame(self._layer_columns(windows)), self.cf_columns)

    def _expert_rows(self, windows: list[_Window]):
        return _cast_experts(_frame(self._expert_columns(windows)))

    def _layer_columns(self, windows: list[_Window]) -> dict[str, Any]:
        n, num_layers = len(windows), len(self.layer_names)
        values_RK = np.empty((0, len(self._value_columns)))
        if windows:
            values_RK = np.concatenate([w.values_LK for w in windows])
        columns: dict[str, Any] = {
            "step": np.repeat(np.array([w.step for w in windows], dtype=np.int64), num_layers),
            "phase": _Coded.of([w.phase for w in windows], num_layers),
            "layer": _Coded(np.tile(np.arange(num_layers), n), self.layer_names),
            "layer_index": np.tile(np.arange(num_layers, dtype=np.int64), n),
            "num_experts": np.tile(np.array(self.num_experts, dtype=np.int64), n),
            "top_k": np.tile(np.array(self.top_k, dtype=np.int64), n),
        }
        for k, name in enumerate(self._value_columns):
            columns[name] = values_RK[:, k].astype(np.int64) if name in _INT_VALUES else values_RK[:, k]
        return {name: columns[name] for name in (*LAYER_COLUMNS, *self.cf_columns)}

    def _expert_columns(self, windows: list[_Window]) -> dict[str, Any]:
        layer_R, expert_R = np.nonzero(self._own_LE)
        per_window = len(layer_R)
        if windows:
            counts_NR = np.stack([w.counts_LE[layer_R, expert_R] for w in windows])
            kept_NR = np.stack([w.kept_LE[layer_R, expert_R] for w in windows])
            total_NR = np.stack([w.counts_LE.sum(axis=1)[layer_R] for w in windows])
        else:
            counts_NR = kept_NR = total_NR = np.empty((0, per_window), dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            load_NR = np.where(total_NR > 0, counts_NR / np.maximum(total_NR, 1), np.nan)
        n = len(windows)
        columns = {
            "step": np.repeat(np.array([w.step for w in windows], dtype=np.int64), per_window),
            "phase": _Coded.of([w.phase for w in windows], per_window),
            "layer": _Coded(np.tile(layer_R, n), self.layer_names),
            "layer_index": np.tile(layer_R.astype(np.int64), n),
            "expert": np.tile(expert_R.astype(np.int64), n),
            "count": counts_NR.reshape(-1).astype(np.int64),
            "kept": kept_NR.reshape(-1).astype(np.int64),
            "load": load_NR.reshape(-1).astype(np.float64),
        }
        return columns

    def save(self, path: str | os.PathLike) -> list[str]:
        """Writes the whole history into directory ``path``: ``layers.csv``, ``experts.csv``, and ``.parquet``
        twins when pyarrow is installed. When ``path`` is the open directory, flushes it instead. Returns the paths.
        """
        path = Path(path)
        if self._directory is not None and path.exists() and path.resolve() == self._directory.resolve():
            self.flush()
            return [str(p) for p in sorted(path.iterdir()) if p.name in _FILES]
        path.mkdir(parents=True, exist_ok=True)
        written = []
        frames = {"layers": self.layer_frame(), "experts": self.expert_frame()}
        for stem, frame in frames.items():
            frame.to_csv(path / f"{stem}.csv", index=False)
            written.append(str(path / f"{stem}.csv"))
        if _has_pyarrow():
            for stem, frame in frames.items():
                frame.to_parquet(path / f"{stem}.parquet", index=False)
                written.append(str(path / f"{stem}.parquet"))
        return written

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A small checkpoint state: a pointer to the files when a directory is open, else the kept windows.

        Plain Python values and CPU tensors only, so it loads with ``torch.load(weights_only=True)``. With a
        directory: ``{"version", "layer_names", "windows", "directory", "files"}`` (``files``: byte size of each
        CSV file written); without, also ``"recent"``: the kept windows as stacked tensors.
        """
        state: dict[str, Any] = {"version": STATE_VERSION, "layer_names": list(self.layer_names)}
        state["windows"] = self._total
        if self._directory is not None and not self._broken:
            self.flush()
            state["directory"] = str(self._directory)
            state["files"] = {
                name: (self._directory / name).stat().st_size
                for name in ("layers.csv", "experts.csv")
                if (self._directory / name).exists()
            }
            return state
        if self._pointer is not None:  # restored but not opened (a process that writes no files): hand it on
            return dict(self._pointer)
        windows = list(self._recent)
        state["directory"] = None
        state["recent"] = {
            "step": torch.tensor([w.step for w in windows], dtype=torch.int64),
            "phase": [w.phase for w in windows],
            "counts": torch.from_numpy(np.stack([w.counts_LE for w in windows])) if windows else torch.empty(0),
            "kept": torch.from_numpy(np.stack([w.kept_LE for w in windows])) if windows else torch.empty(0),
            "values": torch.from_numpy(np.stack([w.values_LK for w in windows])) if windows else torch.empty(0),
            "columns": list(self._value_columns),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (before any window is appended); a pointer waits for :meth:`open`.

        Raises:
            ValueError: the state is of another version, or windows were appended already.
        """
        version = state.get("version")
        if version == 1:
            state = _upgrade_v1(state, self)
        elif version != STATE_VERSION:
            raise ValueError(
                f"Unsupported RouterMonitor state version {version!r}: this moe_monitor reads versions 1 and "
                f"{STATE_VERSION}. The state was saved by another moe_monitor release; load it with that release, or "
                "leave it out (do not call load_state_dict) to start a fresh history"
            )
        if self._total > 0:
            raise ValueError(
                f"load_state_dict must come before the first window: {self._total} windows were collected already"
            )
        if state["layer_names"] != self.layer_names:
            warnings.warn(
                "moe_monitor: the restored history was recorded for other router layers "
                f"({state['layer_names'][:3]}... vs {self.layer_names[:3]}...)",
                RuntimeWarning,
                stacklevel=3,
            )
        if state.get("directory") is not None:
            self._pointer = {key: state[key] for key in ("version", "layer_names", "windows", "directory", "files")}
            self._total = self._written = int(state["windows"])
            if self._directory is not None:  # opened before the restore: continue into the open directory
                directory, self._directory = self._directory, None
                self.open(directory)
            return
        recent = state["recent"]
        columns = list(recent["columns"])
        index = [columns.index(name) if name in columns else None for name in self._value_columns]
        for i, step in enumerate(recent["step"].tolist()):
            values = recent["values"][i].numpy()
            values_LK = np.stack([values[:, j] if j is not None else np.full(len(values), np.nan) for j in index], 1)
            counts_LE = recent["counts"][i].numpy().copy()
            kept_LE = recent["kept"][i].numpy().copy() if "kept" in recent else counts_LE  # older states: counts
            self._recent.append(_Window(int(step), recent["phase"][i], counts_LE, kept_LE, values_LK))
        self._total = int(state["windows"])
        self._written = self._total - len(self._recent)
        if self._directory is not None:
            self._guard(self._write_layers_csv, list(self._recent))
            self.flush()

    # ------------------------------------------------------------------------------------------------ resume
    def _continue_pointer(self, source: Path, target: Path, pointer: dict[str, Any]) -> None:
        windows, sizes = self._total, pointer.get("files", {})
        if not source.exists():
            warnings.warn(
                f"moe_monitor: the checkpoint's history files ({source}) are gone; the files in {target} start at "
                f"window {windows} (the earlier windows are missing)",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        same = source.resolve() == target.resolve()
        for name, size in sizes.items():
            src, dst = source / name, target / name
            actual = src.stat().st_size if src.exists() else 0
            if actual < size:
                warnings.warn(
                    f"moe_monitor: {src} holds {actual} bytes but the checkpoint saw {size}: windows of the first "
                    "part of the run are missing from it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if same:
                if src.exists():
                    os.truncate(src, min(size, actual))
            elif src.exists():
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(_Limited(fin, size), fout)
        for stem in ("layers", "experts"):
            folder = source / f"{stem}.parquet"
            if not folder.exists():
                continue
            for part in sorted(folder.glob("part-*.parquet")):
                first = int(part.stem.split("-")[1])
                if first >= windows:
                    if same:
                        part.unlink()
                elif not same:
                    (target / folder.name).mkdir(exist_ok=True)
                    shutil.copyfile(part, target / folder.name / part.name)

    def _continue_step(self, path: Path, resume_step: int) -> None:
        for name in ("layers.csv", "experts.csv"):
            if (path / name).exists():
                frame = _read_csv(path / name)
                frame[frame.step <= resume_step].to_csv(path / name, index=False)
        for stem in ("layers", "experts"):
            for part in sorted((path / f"{stem}.parquet").glob("part-*.parquet")):
                frame = _read_parts(path, stem, [part])[0]
                kept = frame[frame.step <= resume_step]
                if kept.empty:
                    part.unlink()
                elif len(kept) < len(frame):
                    _write_parquet(kept, part)
        if (path / "layers.csv").exists():
            rows = len(_read_csv(path / "layers.csv"))
        else:
            rows = sum(len(frame) for frame in _read_parts(path, "layers"))
        self._total = self._written = rows // len(self.layer_names)

    @staticmethod
    def _exists_message(path: Path, existing: list[str]) -> str:
        return (
            f"{path} already holds the history of another run ({', '.join(existing)}); give this run its own "
            "directory, or continue that history: restore its checkpoint first (load_state_dict, then open) or "
            "pass open(directory, resume_step=STEP)"
        )


@dataclass(frozen=True)
class _Coded:
    """A string column as codes into a list of names: cheap to repeat, and Arrow writes it without a Python loop."""

    codes: np.ndarray
    names: list[str]

    @classmethod
    def of(cls, values: list[str], repeats: int) -> _Coded:
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return cls(np.repeat(np.array([index[v] for v in values], dtype=np.int64), repeats), names)

    def objects(self) -> np.ndarray:
        return np.array(self.names + [""], dtype=object)[self.codes]


class _Limited:
    """A binary file object that reads at most ``limit`` bytes of ``file``."""

    def __init__(self, file, limit: int) -> None:
        self.file, self.left = file, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.file.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _write_parquet(rows, path: Path) -> None:
    """Writes ``rows`` (a ``pandas.DataFrame``, or columns: name -> numpy array) as the Parquet file ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(rows, dict):
        arrays = {}
        for name, values in rows.items():
            if isinstance(values, _Coded):
                codes = pa.array(values.codes, pa.int32())
                arrays[name] = pa.DictionaryArray.from_arrays(codes, pa.array(values.names, pa.string()))
                arrays[name] = arrays[name].cast(pa.string())
            else:
                arrays[name] = pa.array(values)
        table = pa.table(arrays)
    else:
        table = pa.Table.from_pandas(rows, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a reader never sees half a part, and a crash leaves none.
    temporary = path.with_name(path.name + ".tmp")
    # Dictionary pages for the low-cardinality columns only: trying them on the counts and loads costs time for nothing.
    low = [name for name in table.column_names if name in ("step", "phase", "layer", "layer_index", "expert")]
    pq.write_table(table, temporary, compression="zstd", use_dictionary=low)
    os.replace(temporary, path)


def _append_csv(path: Path, columns: dict[str, Any]) -> None:
    """Appends rows to a CSV file (a header first when it is new), as ``pandas.to_csv`` writes them (NaN empty)."""
    header = not path.exists() or path.stat().st_size == 0
    cells = []
    for values in columns.values():
        if isinstance(values, _Coded):
            cells.append(values.objects().tolist())
        elif values.dtype.kind == "f":
            # repr() is the shortest text that reads back as the same float; pandas reads the empty cell as NaN.
            cells.append(["" if v != v else repr(v) for v in values.tolist()])
        else:
            cells.append(values.tolist())
    with open(path, "a", newline="") as file:
        writer = csv.writer(file)
        if header:
            writer.writerow(columns)
        writer.writerows(zip(*cells))


def _frame(columns: dict[str, Any]):
    import pandas as pd

    return pd.DataFrame({name: v.objects() if isinstance(v, _Coded) else v for name, v in columns.items()})


def _read_parts(directory: Path, stem: str, parts: list[Path] | None = None) -> list:
    """The part files of ``directory/<stem>.parquet`` (or the given ones), in window order, as frames."""
    import pandas as pd

    if parts is None:
        parts = sorted((directory / f"{stem}.parquet").glob("part-*.parquet"))
    return [pd.read_parquet(p) for p in parts]


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path, dtype={"phase": str, "layer": str}, keep_default_na=False, na_values=[""])


def _concat(frames: list):
    import pandas as pd

    frames = [f for f in frames if len(f)] or frames[-1:]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def _cast(frame, types: dict[str, str]):
    # Only the columns that need it: astype over every column costs milliseconds per call in pandas.
    changed = {name: kind for name, kind in types.items() if str(frame[name].dtype) != kind}
    return (frame.astype(changed) if changed else frame)[list(types)]


def _cast_layers(frame, cf_columns: list[str]):
    ints = ("step", "layer_index", "num_experts", "top_k", *_INT_VALUES)
    types = {name: ("int64" if name in ints else "float64") for name in (*LAYER_COLUMNS, *cf_columns)}
    if "skipped" not in frame:  # files written before the skipped assignments were counted
        frame = frame.assign(skipped=np.nan, skipped_fraction=np.nan)
    return _cast(frame, {**types, "phase": "str", "layer": "str"})


def _cast_experts(frame):
    types = {"step": "int64", "phase": "str", "layer": "str", "layer_index": "int64", "expert": "int64"}
    if "kept" not in frame:  # files written before the kept counts: nothing was known to be dropped per expert
        frame = frame.assign(kept=frame["count"])
    return _cast(frame, {**types, "count": "int64", "kept": "int64", "load": "float64"})


def _upgrade_v1(state: dict[str, Any], history: History) -> dict[str, Any]:
    """A version-1 state (the whole history as Python lists) as a version-2 one, keeping its last windows."""
    records = list(state["history"])[-history.keep_windows :]
    columns = list(history._value_columns)
    width = max(history.num_experts)
    counts, values = [], []
    for record in records:
        counts_LE = np.zeros((len(record["counts"]), width), dtype=np.int64)
        for i, row in enumerate(record["counts"]):
            counts_LE[i, : len(row)] = row
        counts.append(counts_LE)
        values.append(
            np.array([record["layer"].get(name, [np.nan] * len(counts_LE)) for name in columns], dtype=np.float64).T
        )
    return {
        "version": STATE_VERSION,
        "layer_names": state["layer_names"],
        "windows": len(state["history"]),
        "directory": None,
        "recent": {
            "step": torch.tensor([r["step"] for r in records], dtype=torch.int64),
            "phase": [r["phase"] for r in records],
            "counts": torch.from_numpy(np.stack(counts)) if counts else torch.empty(0),
            "values": torch.from_numpy(np.stack(values)) if values else torch.empty(0),
            "columns": columns,
        },
    }
