"""Lightning module that trains :class:`~moe_monitor.reference.MoETransformer` as a byte-level language model.

Shape legend: ``B`` batch, ``S`` sequence, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from moe_monitor.reference.config import MoEConfig
from moe_monitor.reference.model import MoETransformer


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``.

    Example:
        >>> [round(warmup_cosine(s, 10, 110), 3) for s in (0, 5, 10, 60, 110, 200)]
        [0.1, 0.6, 1.0, 0.55, 0.1, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ReferenceLM(pl.LightningModule):
    """Next-byte prediction with the reference MoE transformer; the loss is cross-entropy + aux loss + z-loss.

    Args:
        config: the model's :class:`MoEConfig` (or its ``to_dict()`` form, as stored in checkpoints).
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up steps.
        max_steps: steps of the cosine decay (to 10 % of ``lr``); set it to the trainer's ``max_steps``.
        weight_decay: AdamW weight decay of matrices (embeddings included); norms get none.

    Logged metrics:
        ``train/loss`` (the optimised total), ``train/ce_loss``, ``train/aux_loss``, ``train/z_loss`` every
        step; ``val/loss`` (cross-entropy) per validation run.

    Example:
        >>> lm = ReferenceLM(MoEConfig.from_preset("tiny"), max_steps=100)
        >>> batch = {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.randint(0, 256, (2, 16))}
        >>> losses = lm.compute_losses(batch)
        >>> sorted(losses), bool(losses["loss"] > losses["ce_loss"])
        (['aux_loss', 'ce_loss', 'loss', 'z_loss'], True)
    """

    def __init__(
        self,
        config: MoEConfig | dict[str, Any],
        lr: float = 3e-3,
        warmup_steps: int = 50,
        max_steps: int = 1000,
        weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = MoEConfig(**config)
        # Stored as a plain dict so hparams.yaml stays readable and load_from_checkpoint can rebuild it.
        self.save_hyperparameters(
            {
                "config": config.to_dict(),
                "lr": lr,
                "warmup_steps": warmup_steps,
                "max_steps": max_steps,
                "weight_decay": weight_decay,
            }
        )
        self.config = config
        self.model = MoETransformer(config)
        self._val_sums = torch.zeros(2)  # (token-weighted validation loss, tokens) of the running validation
        self._val_batches = 0

    def forward(self, tokens: torch.Tensor) -> Any:
        return self.model(tokens)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy, aux and z losses of one batch, and their sum as ``"loss"``."""
        out = self.model(batch["input_ids"])
        ce_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten())
        return {
            "loss": ce_loss + out.aux_loss + out.z_loss,
            "ce_loss": ce_loss,
            "aux_loss": out.aux_loss,
            "z_loss": out.z_loss,
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{name}": losses[name] for name in ("ce_loss", "aux_loss", "z_loss")})
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_batches = torch.zeros(2, device=self.device), 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(batch["input_ids"])
        ce_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten())
        tokens = batch["labels"].numel()
        # Summed here, logged once at epoch end: one `val/loss` over all validation loaders (one per domain with
        # CorpusDataModule(val_loader_per_domain=True)), where self.log would key each loader apart.
        self._val_sums += torch.stack([ce_loss.detach() * tokens, ce_loss.new_tensor(tokens)])
        self._val_batches += 1

    def on_validation_epoch_end(self) -> None:
        if not self._val_batches:  # e.g. a subclass' own validation_step, which logs what it wants
            return
        loss_sum, tokens = self._val_sums
        self.log("val/loss", loss_sum / tokens.clamp(min=1), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
