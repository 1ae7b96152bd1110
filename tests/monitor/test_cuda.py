"""CUDA: no host sync under ``torch.cuda.set_sync_debug_mode("error")``, CUDA counts equal CPU counts, and the CPU
side of ``benchmarks/gpu.py`` (so nothing in it runs for the first time on a GPU; its run through
``benchmarks/device/run.sh`` is tested in ``tests/benchmarks/test_device_scripts.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import warnings

import pytest
import torch
from monitor_toys import Replay, ToyModel, replay_spec

from moe_monitor import RouterMonitor
from moe_monitor.reference import MoEConfig, MoETransformer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def sync_debug(mode: str):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_training_steps_with_the_monitor_never_sync(autocast):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = ToyModel(d=16, num_experts=8, top_k=2).to(device)  # experts computed densely: the model never syncs
    monitor = RouterMonitor(model, routers=model.router_names, coactivation=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x_BSD = torch.randn(4, 32, 16, device=device)
    mask_BS = torch.ones(4, 32, device=device)
    mask_BS[0, 20:] = 0
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step() -> None:
        with context:
            loss = model(x_BSD).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    monitor.set_token_mask(mask_BS)
    step()  # warm-up: buffers, masks and the column maps are made once, outside the checked steps
    monitor.collect(0)
    with sync_debug("error"):
        for _ in range(3):
            step()
        monitor.window_counts()
    snap = monitor.collect(3)
    assert snap.tokens.tolist() == [3 * (4 * 32 - 12)] * 2
    assert snap.counts.sum(1).tolist() == [2 * 3 * (4 * 32 - 12)] * 2


@needs_cuda
def test_the_monitor_adds_no_sync_to_a_reference_training_step():
    """The reference model may sync (expert dispatch); the monitor must not add one: count the sync warnings."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    config = MoEConfig.from_preset("tiny", n_layers=2, seq_len=32)
    tokens_BS = torch.randint(0, config.vocab_size, (4, 33), device=device)

    def syncs(with_monitor: bool) -> int:
        torch.manual_seed(0)
        model = MoETransformer(config).to(device)
        monitor = RouterMonitor(model) if with_monitor else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(tokens_BS[:, :-1])
                loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss + out.z_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()
        with warnings.catch_warnings(record=True) as caught, sync_debug("warn"):
            warnings.simplefilter("always")
            for _ in range(2):
                step()
        if monitor is not None:
            assert monitor.collect(1).tokens.tolist() == [3 * 4 * 32] * 2
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(with_monitor=True) == syncs(with_monitor=False)


@needs_cuda
def test_cuda_counts_equal_cpu_counts():
    generator = torch.Generator().manual_seed(5)
    logits_TE = torch.randn(64, 8, generator=generator)
    logits_TE[3, 2] = float("-inf")
    idx_TK = logits_TE.topk(2, dim=-1).indices
    snaps = {}
    for device in ("cpu", "cuda"):
        model = torch.nn.Sequential(Replay())
        monitor = RouterMonitor(model, routers=[replay_spec("0", 8, 2)], coactivation=True)
        model(logits_TE.to(device), idx_TK.to(device))
        snaps[device] = monitor.collect(1)
    assert torch.equal(snaps["cpu"].counts, snaps["cuda"].counts)
    for name, value in snaps["cpu"].stats.items():
        torch.testing.assert_close(snaps["cuda"].stats[name], value, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert torch.equal(snaps["cpu"].extras["coactivation"], snaps["cuda"].extras["coactivation"])


# --------------------------------------------------------------------------------------- benchmarks/gpu.py on CPU
def _gpu_script():
    if "gpu_benchmark" in sys.modules:
        return sys.modules["gpu_benchmark"]
    spec = importlib.util.spec_from_file_location("gpu_benchmark", os.path.join(ROOT, "benchmarks", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_script_finds_every_cuda_test_file():
    gpu = _gpu_script()
    files = gpu.cuda_test_files()
    for known in ("tests/monitor/test_cuda.py", "tests/families/test_megatron.py",
                  "tests/callback/test_cuda_lightning.py", "tests/monitor/test_monitor_hooks.py"):  # fmt: skip
        assert known in files, known
    # Every test file that asks torch.cuda.is_available() for anything but skipping ON a GPU machine (a test that
    # needs a machine without one) is in the list.
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        for name in names:
            if name.endswith(".py") and name.startswith("test_"):
                path = os.path.join(folder, name)
                with open(path) as file:
                    text = file.read()
                asks = text.count("torch.cuda.is_available()") - text.count("skipif(torch.cuda.is_available()")
                assert (os.path.relpath(path, ROOT) in files) == (asks > 0), path
    assert "tests/reference/test_cli.py" not in files
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in files)


def test_gpu_script_tests_section_reads_a_real_pytest_run(tmp_path):
    gpu = _gpu_script()
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert 1 + 1 == 2\n"
        "@pytest.mark.skip(reason='needs a thing')\ndef test_skipped():\n    pass\n"
    )
    (tmp_path / "test_broken.py").write_text("def test_bad():\n    assert 1 == 2\n")
    sample, broken = str(tmp_path / "test_sample.py"), str(tmp_path / "test_broken.py")
    passed = gpu.run_cuda_tests([sample], timeout=120, allow_skips=True)
    assert (passed.status, passed.detail) == ("PASS", "1 passed, 0 failed, 1 skipped")
    assert sorted((t["name"].split("::")[-1], t["outcome"]) for t in passed.results["tests"]) == [
        ("test_ok", "passed"), ("test_skipped", "skipped")
    ]  # fmt: skip
    strict = gpu.run_cuda_tests([sample], timeout=120, allow_skips=False)  # on CUDA nothing may skip
    assert strict.status == "FAIL" and "needs a thing" in strict.detail
    failed = gpu.run_cuda_tests([sample, broken], timeout=120, allow_skips=True)
    assert failed.status == "FAIL" and failed.detail.startswith("1 passed, 1 failed, 1 skipped")
    # The section as it runs on CUDA (with --tests-k), here on these files; off CUDA it skips.
    rerun = gpu.tests_section(torch.device("cuda"), left_s=300, later_s=100, keyword="test_ok", files=[sample, broken])
    assert (rerun.status, rerun.detail) == ("PASS", "1 passed, 0 failed, 0 skipped")
    assert gpu.tests_section(torch.device("cpu"), left_s=300, later_s=0, files=[sample]).status == "SKIP"


def test_gpu_script_leaves_out_a_section_over_its_budget_and_fails(tmp_path, capsys):
    gpu = _gpu_script()
    report = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--quick", "--sections", "hf,tokens", "--budget", "5", "--json", str(report)]
    assert gpu.main(argv) == 1
    sections = json.loads(report.read_text())["sections"]
    assert {name: entry["status"] for name, entry in sections.items()} == {"hf": "OVER", "tokens": "OVER"}
    assert "total 0 s; FAILED: hf, tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu.parse_args(["--sections", "tokens,nope"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--budget", "0"])



def test_gpu_script_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    # Not a skip on a GPU machine: gpu.py's tests section allows no skip there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_script().main(["--device", "cuda", "--quick"]) == 1
    assert "sees no CUDA device" in capsys.readouterr().out


def test_gpu_script_judges_the_two_dispatches_by_their_first_loss():
    gpu = _gpu_script()
    rows = [dict(preset="base", dispatch=d, tokens_per_s=2e6, first_loss=6.0) for d in ("loop", "grouped")]
    assert gpu.judge_tokens(rows).status == "PASS"
    off = [rows[0], {**rows[1], "first_loss": 6.0 * (1 + 2 * gpu.LOSS_TOLERANCE)}]
    assert gpu.judge_tokens(off).status == "FAIL"
    assert gpu.judge_tokens([rows[0], {**rows[1], "first_loss": float("nan")}]).status == "FAIL"


def test_set_dispatch_reaches_every_moe_layer():
    gpu = _gpu_script()
    model = MoETransformer(MoEConfig.from_preset("tiny", n_layers=3, seq_len=8))
    assert gpu.set_dispatch(model, "grouped") == 3
    assert {m.dispatch for m in model.modules() if hasattr(m, "dispatch")} == {"grouped"}
