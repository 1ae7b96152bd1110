"""A byte-level corpus that ships with Python: English help text and the standard library's own sources.

Shape legend: ``N`` bytes of one domain's text, ``S`` sequence length, ``B`` batch.

Two domains, so routers have something to specialise on:

- ``english``: the help topics of ``pydoc_data.topics`` (the text behind ``help("if")``), about 0.5 MB.
- ``python``: the top-level ``.py`` modules of the standard library, in sorted file order, capped at
  :data:`PYTHON_CAP_BYTES`.

Each domain is cut into blocks of :data:`SPLIT_BLOCK_BYTES`; every ``val_every``-th block goes to validation, the
rest to training, so both splits cover the whole text and never share a byte. Batches are dicts
``{"input_ids": int64 [B, S], "labels": int64 [B, S], "domain": int64 [B]}`` with ``labels`` the next bytes.
"""

from __future__ import annotations

import functools
import pathlib
import sysconfig

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

DOMAINS: tuple[str, ...] = ("english", "python")
PYTHON_CAP_BYTES = 4 * 1024 * 1024
SPLIT_BLOCK_BYTES = 4096


@functools.lru_cache(maxsize=1)
def load_corpus() -> dict[str, torch.Tensor]:
    """The two domains as uint8 tensors (read once per process, in well under a second).

    Example:
        >>> corpus = load_corpus()
        >>> list(corpus), corpus["english"].dtype
        (['english', 'python'], torch.uint8)
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise RuntimeError(
            "The bundled corpus needs the standard library's pydoc_data package, which this Python build lacks; "
            "install the full Python standard library (e.g. the distribution's python3 'full' package)."
        ) from error
    english = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if size >= PYTHON_CAP_BYTES:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
    if not chunks:
        raise RuntimeError(f"No standard-library sources found under {stdlib}; the 'python' domain needs them.")
    python = b"\n".join(chunks)[:PYTHON_CAP_BYTES]
    return {
        name: torch.frombuffer(bytearray(text), dtype=torch.uint8) for name, text in zip(DOMAINS, (english, python))
    }


def split_text(text_N: torch.Tensor, val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits one domain into (train, val) by blocks: every ``val_every``-th block is validation.

    Example:
        >>> train, val = split_text(torch.arange(10 * SPLIT_BLOCK_BYTES) % 7, val_every=5)
        >>> train.numel() // SPLIT_BLOCK_BYTES, val.numel() // SPLIT_BLOCK_BYTES
        (8, 2)
    """
    block_id_N = torch.arange(text_N.numel()) // SPLIT_BLOCK_BYTES
    is_val_N = block_id_N % val_every == val_every - 1
    return text_N[~is_val_N], text_N[is_val_N]


@functools.lru_cache(maxsize=4)
def corpus_splits(val_every: int = 10) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train texts, val texts), one per domain in :data:`DOMAINS` order; computed once per ``val_every``.

    Example:
        >>> train, val = corpus_splits()
        >>> len(train), 8 < train[0].numel() // val[0].numel() < 10
        (2, True)
    """
    splits = [split_text(text, val_every) for text in load_corpus().values()]
    return [train for train, _ in splits], [val for _, val in splits]


def _window(text_N: torch.Tensor, offset: int, seq_len: int, domain: int) -> dict[str, torch.Tensor]:
    window = text_N[offset : offset + seq_len + 1].long()
    return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(domain)}


class RandomWindows(Dataset):
    """``num_samples`` windows at seeded random offsets, the domain drawn uniformly; item ``i`` is fixed by the seed.

    Example:
        >>> ds = RandomWindows([torch.arange(100, dtype=torch.uint8)], seq_len=8, num_samples=4, seed=0)
        >>> item = ds[0]
        >>> bool((item["labels"][:-1] == item["input_ids"][1:]).all()), item["input_ids"].shape
        (True, torch.Size([8]))
    """

    def __init__(self, texts: list[torch.Tensor], seq_len: int, num_samples: int, seed: int) -> None:
        for text in texts:
            if text.numel() < seq_len + 2:
                raise ValueError(f"A corpus domain has {text.numel()} bytes, too few for seq_len={seq_len} windows.")
        self.texts, self.seq_len = texts, seq_len
        generator = torch.Generator().manual_seed(seed)
        self.domain_N = torch.randint(len(texts), (num_samples,), generator=generator)
        # Uniform in [0, 1) scaled per domain, so every domain's offsets come from one draw.
        fraction_N = torch.rand(num_samples, generator=generator, dtype=torch.float64)
        max_offset_N = torch.tensor([t.numel() - seq_len - 1 for t in texts], dtype=torch.float64)[self.domain_N]
        self.offset_N = (fraction_N * max_offset_N).long()

    def __len__(self) -> int:
        return self.domain_N.numel()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        domain = int(self.domain_N[index])
        return _window(self.texts[domain], int(self.offset_N[index]), self.seq_len, domain)


class EvenWindows(Dataset):
    """``per_domain`` windows evenly spaced over each domain's text: the same set every time.

    Example:
        >>> ds = EvenWindows([torch.arange(100, dtype=torch.uint8)], seq_len=8, per_domain=3)
        >>> [int(ds[i]["input_ids"][0]) for i in range(len(ds))]
        [0, 45, 91]
    """

    def __init__(self, texts: list[torch.Tensor], seq_len: int, per_domain: int) -> None:
        self.texts, self.seq_len = texts, seq_len
        self.items: list[tuple[int, int]] = []
        for domain, text in enumerate(texts):
            last = text.numel() - seq_len - 1
            if last < 0:
                raise ValueError(f"A corpus domain has {text.numel()} bytes, too few for seq_len={seq_len} windows.")
            steps = torch.linspace(0, last, per_domain).long().tolist()
            self.items.extend((domain, offset) for offset in steps)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        domain, offset = self.items[index]
        return _window(self.texts[domain], offset, self.seq_len, domain)


class CorpusDataModule(pl.LightningDataModule):
    """Random training windows and a fixed validation set from the bundled corpus.

    Args:
        seq_len: tokens (bytes) per sample.
        batch_size: samples per batch, for training and validation.
        seed: fixes the training windows (same seed, same batches).
        train_samples: length of the training dataset; by default about one pass over the training bytes.
            ``moe-monitor train`` sets it to ``steps * batch_size`` so the progress bar ends with the run.
        val_per_domain: validation windows per domain.
        val_every: every ``val_every``-th block of each domain is held out for validation.
        num_workers: ``DataLoader`` workers; 0 is fastest for this in-memory data.
        val_loader_per_domain: ``val_dataloader`` gives one loader per domain, in :data:`DOMAINS` order, so every
            validation batch holds one domain (for ``MoEMonitor(val_domains=DOMAINS)``); else one loader of both.

    Example:
        >>> dm = CorpusDataModule(seq_len=16, batch_size=4, seed=0)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape, batch["labels"].dtype, sorted(batch)
        (torch.Size([4, 16]), torch.int64, ['domain', 'input_ids', 'labels'])
        >>> split = CorpusDataModule(seq_len=16, batch_size=4, val_per_domain=4, val_loader_per_domain=True)
        >>> split.setup()
        >>> [next(iter(loader))["domain"].tolist() for loader in split.val_dataloader()]
        [[0, 0, 0, 0], [1, 1, 1, 1]]
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        seed: int = 0,
        train_samples: int | None = None,
        val_per_domain: int = 32,
        val_every: int = 10,
        num_workers: int = 0,
        val_loader_per_domain: bool = False,
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be at least 1.")
        if val_every < 2:
            raise ValueError(f"val_every={val_every} must be at least 2 (1 would leave no training text).")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train_samples, self.val_per_domain, self.val_every = train_samples, val_per_domain, val_every
        self.num_workers, self.val_loader_per_domain = num_workers, val_loader_per_domain
        self.train_set: RandomWindows | None = None
        self.val_set: EvenWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_texts, val_texts = corpus_splits(self.val_every)
        num_samples = self.train_samples or sum(t.numel() for t in train_texts) // self.seq_len
        self.train_set = RandomWindows(train_texts, self.seq_len, num_samples, self.seed)
        self.val_set = EvenWindows(val_texts, self.seq_len, self.val_per_domain)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_loader_per_domain:
            return self._loader(self.val_set)
        # EvenWindows holds the domains one after the other, `val_per_domain` windows each.
        per = self.val_per_domain
        return [self._loader(Subset(self.val_set, range(d * per, (d + 1) * per))) for d in range(len(DOMAINS))]

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
