"""Run under torchrun by test_finetune_oft.py: two ranks fine-tune with an auxiliary loss whose head sits
outside the DDP wrapper, and rank 1's batches add nothing to that head. Each rank saves its head's weights
before and after, for the test to compare.

Usage: torchrun --nproc-per-node 2 ddp_auxiliary_worker.py CHECKPOINT DATA_DIR DATASET_NAME OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from openvla_ros.finetune.config import FinetuneConfig
from openvla_ros.finetune.trainer import Trainer


class _RankedPull(torch.nn.Module):
    """A head on the first action state pulled to zero on rank 0; on rank 1 it adds nothing, as a frame
    where the named block cannot be seen adds nothing to the localisation heads."""

    def __init__(self, network, tokenizer, image_settings) -> None:
        super().__init__()
        width = network.vla.config.text_config.hidden_size
        self.head = torch.nn.Linear(width, 3)
        with torch.no_grad():  # the same start on every rank, whatever the global generator holds
            self.head.weight.copy_(torch.linspace(-0.2, 0.2, 3 * width).reshape(3, width))
            self.head.bias.fill_(0.1)
        self.rank = int(os.environ["RANK"])

    def forward(self, pixel_values, input_ids, prompt_lengths, internals) -> torch.Tensor:
        if self.rank == 1:
            return internals.action_hidden.new_zeros(())
        return self.head(internals.action_hidden[:, 0]).pow(2).mean()


def main(checkpoint: str, data_dir: str, name: str, out: str) -> None:
    config = FinetuneConfig(vla_path=checkpoint, data_dir=data_dir, dataset_name=name, out=out, max_steps=3,
                            batch_size=2, learning_rate=2e-3, lora_rank=8, save_steps=3, eval_steps=0,
                            log_steps=1, image_aug=False, device="cpu", seed=3, action_head="l1", chunk=4,
                            use_proprio=False, num_images=1)
    trainer = Trainer(config, auxiliary=_RankedPull)
    initial = {k: v.detach().clone() for k, v in trainer.auxiliary.state_dict().items()}
    trainer.run()
    torch.save({"initial": initial, "final": trainer.auxiliary.state_dict()},
               Path(out) / f"auxiliary_rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
