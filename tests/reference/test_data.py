"""The bundled corpus: fast, two domains, a disjoint deterministic split, seeded windows."""

from __future__ import annotations

import time

import pytest
import torch

from moe_monitor.reference.data import (
    DOMAINS,
    PYTHON_CAP_BYTES,
    SPLIT_BLOCK_BYTES,
    CorpusDataModule,
    EvenWindows,
    RandomWindows,
    load_corpus,
    split_text,
)


def test_corpus_loads_fast_with_two_domains():
    load_corpus.cache_clear()
    start = time.perf_counter()
    corpus = load_corpus()
    assert time.perf_counter() - start < 1.0
    assert tuple(corpus) == DOMAINS
    english, python = (corpus[name].numpy().tobytes() for name in DOMAINS)
    assert b'The "if" statement' in english and len(english) > 300_000
    assert b"def " in python and b"import " in python
    assert 1_000_000 < len(python) <= PYTHON_CAP_BYTES
    assert load_corpus() is corpus  # cached


def test_split_is_a_disjoint_block_partition():
    text_N = torch.arange(25 * SPLIT_BLOCK_BYTES + 17) % 251
    train, val = split_text(text_N.to(torch.uint8), val_every=5)
    assert train.numel() + val.numel() == text_N.numel()
    assert val.numel() == 5 * SPLIT_BLOCK_BYTES  # blocks 4, 9, 14, 19, 24
    expected_val = torch.cat([text_N[b * SPLIT_BLOCK_BYTES : (b + 1) * SPLIT_BLOCK_BYTES] for b in (4, 9, 14, 19, 24)])
    assert torch.equal(val.long(), expected_val)


def test_windows_are_next_token_pairs_within_text():
    text = torch.arange(200, dtype=torch.uint8)
    ds = RandomWindows([text], seq_len=16, num_samples=50, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        start = int(item["input_ids"][0])
        assert item["input_ids"].tolist() == list(range(start, start + 16))
        assert item["labels"].tolist() == list(range(start + 1, start + 17))


def test_training_windows_are_seeded_and_val_is_fixed():
    def first_batches(seed: int):
        dm = CorpusDataModule(seq_len=32, batch_size=4, seed=seed, train_samples=40)
        dm.setup()
        return next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))

    (train_a, val_a), (train_b, _), (train_c, val_c) = first_batches(0), first_batches(0), first_batches(1)
    assert torch.equal(train_a["input_ids"], train_b["input_ids"])
    assert not torch.equal(train_a["input_ids"], train_c["input_ids"])
    assert torch.equal(val_a["input_ids"], val_c["input_ids"])
    assert train_a["input_ids"].dtype == torch.int64 and train_a["input_ids"].shape == (4, 32)
    assert torch.equal(train_a["input_ids"][:, 1:], train_a["labels"][:, :-1])


def test_both_domains_are_sampled_and_validated():
    dm = CorpusDataModule(seq_len=32, batch_size=8, seed=0, train_samples=400, val_per_domain=5)
    dm.setup()
    domains = torch.cat([batch["domain"] for batch in dm.train_dataloader()])
    assert 150 < int((domains == 0).sum()) < 250
    assert [int(dm.val_set[i]["domain"]) for i in range(len(dm.val_set))] == [0] * 5 + [1] * 5


def test_too_short_text_raises():
    with pytest.raises(ValueError, match="too few for seq_len=16"):
        EvenWindows([torch.zeros(10, dtype=torch.uint8)], seq_len=16, per_domain=2)
    with pytest.raises(ValueError, match="val_every=1"):
        CorpusDataModule(val_every=1)
