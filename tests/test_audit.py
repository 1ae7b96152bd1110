"""``moe_monitor.audit`` and ``moe-monitor audit``: a saved tiny Mixtral counted against its own
``output_router_logits``, reference checkpoints with a collapse built into the weights against healthy ones, eval
mode without gradients, padding, the HTML report, and the errors."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_monitor import cli
from moe_monitor.audit import AuditInputError, _batches, audit, audit_saved
from moe_monitor.detect import achievable_range

transformers = pytest.importorskip("transformers")

VOCAB = 64
SHRINK = dict(d_model=16, n_layers=2, n_heads=2, seq_len=16, n_experts=8, top_k=2, d_expert=16)


def _mixtral(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _topk_counts(logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor) -> list[int]:
    """Assignments per expert from a router's logits, counted in a plain loop over the unmasked tokens."""
    counts = [0] * logits_TE.shape[-1]
    for row, keep in zip(logits_TE.float().softmax(-1).topk(top_k, dim=-1).indices.tolist(), mask_T.tolist()):
        if keep:
            for expert in row:
                counts[expert] += 1
    return counts


def test_saved_mixtral_audited_through_the_cli_counts_what_the_model_routes(tmp_path, capsys):
    model_dir = tmp_path / "mixtral"
    _mixtral().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    argv = ["audit", str(model_dir), "--data", str(text), "--max-batches", "3", "--batch-size", "2", "--seq-len", "16"]
    assert cli.main([*argv, "--csv", str(tmp_path / "tables"), "-o", str(tmp_path / "audit.html")]) == 0
    out = capsys.readouterr().out
    assert "bytes mapped modulo the vocabulary (64)" in out and "model.layers.1.mlp.gate" in out

    # The same windows, routed by an independently loaded copy of the model that reports its router logits.
    ids = torch.frombuffer(bytearray(text.read_bytes()), dtype=torch.uint8).long() % VOCAB
    reference = transformers.MixtralForCausalLM.from_pretrained(model_dir).eval()
    expected = [[0] * 4, [0] * 4]
    for batch in _batches([ids], 16, 2, 3, seed=0):
        with torch.no_grad():
            logits = reference(batch["input_ids"], output_router_logits=True).router_logits
        for layer, logits_TE in enumerate(logits):
            got = _topk_counts(logits_TE, 2, batch["attention_mask"].flatten())
            expected[layer] = [a + b for a, b in zip(expected[layer], got)]
    experts = pd.read_csv(tmp_path / "tables" / "experts.csv")
    counted = [experts[experts.layer_index == i].sort_values("expert")["count"].tolist() for i in range(2)]
    assert counted == expected and sum(expected[0]) == 3 * 2 * 16 * 2
    layers = pd.read_csv(tmp_path / "tables" / "layers.csv")
    assert layers.tokens.tolist() == [3 * 2 * 16] * 2 and layers.phase.tolist() == ["audit"] * 2
    assert "model.layers.0.mlp.gate" in (tmp_path / "audit.html").read_text()


def test_a_tokenizer_saved_with_the_model_tokenizes_the_text(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = "the quick brown fox jumps over lazy dog".split()
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model_dir = tmp_path / "mixtral"
    _mixtral(4).save_pretrained(model_dir)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "words.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and the cat " * 8)  # 96 words
    argv = ["audit", str(model_dir), "--data", str(text), "--max-batches", "2", "--batch-size", "2", "--seq-len", "8"]
    assert cli.main([*argv, "--csv", str(tmp_path / "tables")]) == 0
    assert f"tokenized with the tokenizer saved in {model_dir}" in capsys.readouterr().out

    ids = torch.tensor(tokenizer(text.read_text())["input_ids"])
    assert ids.numel() == 96 and int(ids.max()) == len(words)  # one id per word, "and" / "cat" unknown
    reference = transformers.MixtralForCausalLM.from_pretrained(model_dir).eval()
    expected = [0] * 4
    for batch in _batches([ids], 8, 2, 2, seed=0):
        with torch.no_grad():
            logits_TE = reference(batch["input_ids"], output_router_logits=True).router_logits[1]
        expected = [a + b for a, b in zip(expected, _topk_counts(logits_TE, 2, batch["attention_mask"].flatten()))]
    experts = pd.read_csv(tmp_path / "tables" / "experts.csv")
    assert experts[experts.layer_index == 1].sort_values("expert")["count"].tolist() == expected


def test_padding_is_left_out_and_the_model_is_left_as_it_was():
    model = _mixtral(1)
    model.train()
    model.model.layers[0].eval()  # a mixed state, restored module by module
    before = {name: module.training for name, module in model.named_modules()}
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 7:], mask[2, 3:] = 0, 0
    grad_enabled = []
    gate = model.model.layers[1].mlp.gate
    handle = gate.register_forward_hook(lambda *_: grad_enabled.append((torch.is_grad_enabled(), gate.training)))
    report = audit(model, [{"input_ids": ids, "attention_mask": mask}])
    handle.remove()
    assert grad_enabled == [(False, False)]  # no gradients, eval mode
    assert {name: module.training for name, module in model.named_modules()} == before
    assert all(not layer.mlp.gate._forward_hooks for layer in model.model.layers)
    assert all(p.grad is None for p in model.parameters())

    with torch.no_grad():
        logits = model.eval()(ids, attention_mask=mask, output_router_logits=True).router_logits
    frame = report.expert_frame()
    for layer, logits_TE in enumerate(logits):
        counted = frame[frame.layer_index == layer].sort_values("expert")["count"].tolist()
        assert counted == _topk_counts(logits_TE, 2, mask.flatten())
    assert report.layer_frame().tokens.tolist() == [int(mask.sum())] * 2 == [7 + 12 + 3] * 2


def _checkpoint(tmp_path: Path, name: str, seed: int, scenario: str | None) -> Path:
    """A 2-step ``moe-monitor train`` run (the scenario's collapse is built into the weights before step 1)."""
    argv = ["train", "--steps", "2", "--batch-size", "2", "--threads", "1", "--val-every", "0", "--log-every", "1",
            "--logger", "none", "--no-monitor", "--seed", str(seed), "--out", str(tmp_path),
            "--name", name]  # fmt: skip
    assert cli.main([*argv, *(["--scenario", scenario] if scenario else [])]) == 0
    return tmp_path / name


@pytest.mark.slow
def test_collapsed_reference_checkpoint_reads_collapsed_and_a_healthy_one_healthy(tmp_path, monkeypatch, capsys):
    from moe_monitor.reference import config

    monkeypatch.setitem(config.PRESETS, "tiny", SHRINK)
    floor, _ = achievable_range(8, 2)
    for seed in (0, 1):
        collapsed = audit_saved(_checkpoint(tmp_path, f"biased{seed}", seed, "biased_init"), max_batches=4)
        healthy = audit_saved(_checkpoint(tmp_path, f"plain{seed}", seed, None), max_batches=4)
        for report, want in ((collapsed, "collapsed"), (healthy, "healthy")):
            frame = report.layer_frame()
            # Fraction of the achievable entropy range, the detector's scale; its threshold is 0.4.
            used = ((frame.load_entropy - floor) / (1 - floor)).tolist()
            if want == "collapsed":
                assert all(u < 0.2 for u in used), used
                # The scenario points the gate rows of experts 0 and 1 along every token's shared direction.
                assert all(v.text.startswith("collapsed onto experts 0, 1 (") for v in report.verdicts), report
                assert all(v.severity == "critical" for v in report.verdicts) and not report.healthy
            else:
                assert all(u > 0.7 for u in used), used
                assert [v.text for v in report.verdicts] == ["healthy", "healthy"] and report.healthy
    html = collapsed.to_html(tmp_path / "collapsed.html").read_text()
    assert "collapsed onto experts 0, 1" in html and "blocks.1.moe.router" in html
    assert "0 of 2 layers healthy." in str(collapsed)


@pytest.mark.slow
def test_cli_audits_a_run_folder_on_a_text_file(tmp_path, monkeypatch, capsys):
    from moe_monitor.reference import config

    monkeypatch.setitem(config.PRESETS, "tiny", SHRINK)
    run = _checkpoint(tmp_path, "run", 0, None)
    short = tmp_path / "short.txt"
    short.write_bytes(b"0123456789")  # shorter than a sequence: one 10-token sequence per row
    capsys.readouterr()
    argv = ["audit", str(run), "--data", str(short), "--max-batches", "3", "--batch-size", "2", "--csv", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "data: " + str(short) in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "layers.csv").tokens.tolist() == [3 * 2 * 10] * 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "is neither a Hugging Face model folder (no config.json) nor a .ckpt file"),
        (lambda p: p / "missing.ckpt", "is neither a Hugging Face model folder"),
    ],
)
def test_cli_errors_say_what_to_pass(tmp_path, capsys, make, message):
    assert cli.main(["audit", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_missing_text_file_and_bad_sizes(tmp_path, capsys):
    model_dir = tmp_path / "mixtral"
    _mixtral().save_pretrained(model_dir)
    assert cli.main(["audit", str(model_dir), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "no such file; pass a UTF-8 text file, or leave --data out" in capsys.readouterr().err
    assert cli.main(["audit", str(model_dir), "--max-batches", "0"]) == 2
    assert "--max-batches=0 must be at least 1" in capsys.readouterr().err


def test_library_errors():
    model = _mixtral()
    with pytest.raises(AuditInputError, match="batches is empty"):
        audit(model, [])
    with pytest.raises(AuditInputError, match="max_batches=0"):
        audit(model, [torch.zeros(1, 4, dtype=torch.long)], max_batches=0)


def test_max_batches_caps_the_run_and_coactivation_counts_pairs():
    model = _mixtral(3)
    batches = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    report = audit(model, iter(batches), max_batches=2)
    assert report.batches == 2 and report.layer_frame().tokens.tolist() == [2 * 2 * 8] * 2
    with torch.no_grad():
        logits = [model.eval()(b, output_router_logits=True).router_logits[0] for b in batches[:2]]
    idx_TK = torch.cat(logits).softmax(-1).topk(2, dim=-1).indices.tolist()
    pairs = torch.zeros(4, 4)
    for a, b in idx_TK:
        pairs[a, b] += 1
        pairs[b, a] += 1
    coact = report.coactivation(0).to_numpy()
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(torch.tensor(coact, dtype=torch.float32)[off_diagonal], pairs[off_diagonal])
    top = report.layer_frame().top_coactivation[0]
    assert math.isclose(top, float(pairs.max()) / 32)


def test_example_audits_a_tiny_model(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "audit.py"
    spec = importlib.util.spec_from_file_location("audit_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--out", str(tmp_path)])
    assert (tmp_path / "audit.html").is_file()
    assert report.batches == 4 and len(report.verdicts) == 2
