"""Screenshot of the MoEMonitor TensorBoard dashboards for the README (``docs/images/tensorboard.png``).

Runs a short real training of the reference model with ``MoEMonitor`` (or takes an existing TensorBoard run
directory), serves it with a real ``tensorboard --logdir`` on 127.0.0.1 and a free port, and captures the page
with headless Chromium.

Usage::

    python scripts/tensorboard_screenshot.py                      # train ~2 minutes on CPU, then capture
    python scripts/tensorboard_screenshot.py --logdir runs/x      # capture an existing run
    python scripts/tensorboard_screenshot.py --view scalars       # the SCALARS tab filtered to moe/ instead

Chromium: Debian's ``chromium`` package. When it is missing the script installs it with ``apt-get`` if it runs as
root, and otherwise says what to install.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "images" / "tensorboard.png"
MAX_BYTES = 500_000
VIEWS = {
    # One chart per statistic with a line per layer, from the layout MoEMonitor writes.
    "custom_scalars": "#custom_scalars",
    "scalars": "#scalars&regexInput=moe/train/(load_entropy|max_violation)&_smoothingWeight=0",
    "histograms": "#histograms&regexInput=moe/train/expert_load",
    "images": "#images&regexInput=load_heatmap",
}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def train(logdir: Path, steps: int, seed: int) -> Path:
    """Trains a small reference model with MoEMonitor; returns the TensorBoard version directory."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from moe_monitor import MoEMonitor
    from moe_monitor.reference import CorpusDataModule, MoEConfig, ReferenceLM

    pl.seed_everything(seed, verbose=False)
    # No aux loss, so the routers drift away from balance and the charts have something to show.
    config = MoEConfig(
        d_model=64, n_layers=4, n_heads=4, seq_len=64, n_experts=8, top_k=2, d_expert=64, aux_loss_coef=0.0
    )
    module = ReferenceLM(config, lr=3e-3, warmup_steps=10, max_steps=steps)
    data = CorpusDataModule(seq_len=config.seq_len, batch_size=16, train_samples=steps * 16, val_per_domain=8)
    logger = TensorBoardLogger(logdir, name="moe")
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[MoEMonitor(log_every_n_steps=max(1, steps // 30))],
        logger=logger,
        val_check_interval=max(1, steps // 4),
        limit_val_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return Path(logger.log_dir)


def find_chromium(install: bool) -> str:
    """Path of a Chromium binary; installs Debian's ``chromium`` with apt-get when allowed and possible."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    apt = shutil.which("apt-get")
    if install and apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("chromium not found; installing it with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([apt, "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([apt, "install", "-y", "--no-install-recommends", "chromium"], check=True, env=env)
        path = shutil.which("chromium")
        if path:
            return path
    sys.exit(
        "Headless Chromium is needed for the screenshot. Install it, e.g. `sudo apt-get install chromium` on "
        "Debian/Ubuntu, or put `chromium` / `google-chrome` on PATH, then run this script again."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_tensorboard(logdir: Path, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """Starts ``tensorboard --logdir`` and waits until it answers and has read the run's event files."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--reload_interval", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited: {server.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2) as reply:
                if b"moe/" in reply.read():
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"tensorboard did not serve the moe/ scalars within {timeout_s:.0f} s")


def capture(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="moe-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            url,
        ]
        subprocess.run(command, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")


def shrink(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """Re-encodes the PNG with a 256-colour palette when it is larger than ``max_bytes``; returns its size."""
    if path.stat().st_size <= max_bytes:
        return path.stat().st_size
    from PIL import Image

    image = Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="existing TensorBoard run directory (default: train one)")
    parser.add_argument("--steps", type=int, default=150, help="training steps when no --logdir is given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", choices=sorted(VIEWS), default="custom_scalars")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time Chromium lets the page load")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install chromium")
    args = parser.parse_args(argv)

    chromium = find_chromium(install=not args.no_install)
    with tempfile.TemporaryDirectory(prefix="moe-tb-") as scratch:
        logdir = args.logdir or train(Path(scratch), args.steps, args.seed)
        port = free_port()
        server = start_tensorboard(logdir, port)
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            url = f"http://127.0.0.1:{port}/{VIEWS[args.view]}"
            capture(chromium, url, args.out, args.width, args.height, args.budget_ms)
        finally:
            server.terminate()
            server.wait(timeout=30)
    size = shrink(args.out)
    print(f"wrote {args.out} ({size / 1000:.0f} kB) from {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
