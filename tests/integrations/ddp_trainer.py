"""One process of the 2-process Trainer test (run by ``torch.distributed.run``): writes its layer frame."""

from __future__ import annotations

import os
import sys

import torch
from transformers import Trainer

from moe_monitor.integrations.transformers import MoETrainerCallback
from tests.integrations.hf_toys import PaddedTokens, tiny_model, training_args


def main(out: str) -> None:
    callback = MoETrainerCallback(log_every=4)
    args = training_args(out, ddp_backend="gloo", max_steps=4, eval_strategy="steps", eval_steps=4)
    trainer = Trainer(
        model=tiny_model("mixtral"),
        args=args,
        train_dataset=PaddedTokens(16),
        eval_dataset=PaddedTokens(8, offset=100),  # 4 samples, one batch, per process
        callbacks=[callback],
    )
    trainer.train()
    callback.watcher.layer_frame().to_csv(os.path.join(out, f"rank{os.environ['RANK']}.csv"), index=False)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
