"""Training an energy model on a finished OFT model, the VLA frozen (the variant its authors evaluated).

Each step takes B chunk windows, runs the frozen OFT model once (no gradient) for the last-layer hidden
states of the whole sequence, and scores every context against every recorded chunk of the batch: a
B x B energy matrix whose diagonal holds the true pairs. The loss is in-batch InfoNCE over its rows,
``cross_entropy(-E / temperature, arange(B))``: each observation has to give its own chunk the lowest
energy among the B. Only the energy model trains (its own AdamW, gradient clipping, linear warm-up of
the learning rate). Logged: the loss, E_pos (mean of the diagonal), E_neg (mean off the diagonal) and
the retrieval accuracy (rows whose lowest energy is on the diagonal).

Run layout in ``out``::

    energy_config.json           settings of the run
    metrics.jsonl                one line per logged step and split
    checkpoints/step-000500/     energy_model.safetensors + energy_model.json + training_state.pt
    energy/                      the final energy_model.safetensors + energy_model.json

and the final files also go beside the head in the OFT model directory (unless ``write_to_model`` is off),
where :func:`~openvla_ros.model.oft_loading.load_energy_model` finds them. The actions are normalised
with the OFT model's own statistics, so the energy sees exactly the space its head predicts in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openvla_ros.errors import OpenVLAError, TrainingError
from openvla_ros.finetune.checkpoints import (
    list_checkpoints,
    newest_checkpoint,
    remove_stale_checkpoint_staging,
    restore_training_state,
    training_state,
    write_checkpoint,
)
from openvla_ros.finetune.chunks import ChunkBatch, ChunkSampleBuilder, check_chunk_data, collate_chunks
from openvla_ros.finetune.data import epoch_order, load_frames, open_rlds, sample_rng
from openvla_ros.model.action_codec import select_unnorm_key
from openvla_ros.model.energy import EnergyModel, EnergySpec, energy_context_mask
from openvla_ros.model.loading import (
    load_tokenizer,
    read_config,
    read_image_settings,
    resolve_checkpoint_dir,
    resolve_device,
)
from openvla_ros.model.oft_loading import (
    ENERGY_NAME,
    is_oft_checkpoint,
    load_component_state,
    load_oft_model,
    save_energy_model,
)
from openvla_ros.model.policy import default_unnorm_key

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"


@dataclass
class EnergyTrainingConfig:
    """Settings of one energy training run (defaults follow the authors' frozen-VLA run).

    Attributes:
        model: the finished OFT model (checkpoint directory or hub id); frozen.
        data_dir, dataset_name: the RLDS dataset (its ``train`` split; ``val`` when present).
        out: run directory (checkpoints, metrics, final files).
        unnorm_key: statistics key of the OFT model (default: the dataset name if the model has it).
        max_steps, batch_size: optimiser steps and windows per step (B >= 2: B - 1 negatives each).
        learning_rate, weight_decay: AdamW settings of the energy model.
        warmup_steps: linear learning-rate warm-up from 0 (the authors discarded updates instead).
        max_grad_norm: gradient clipping norm (0 disables).
        temperature: InfoNCE temperature (logits = -E / temperature).
        hidden_dim, num_heads, dropout: energy model sizes (published: 512, 8, 0.2).
        image_aug: random crops and colour jitter on the observations.
        dtype, device, quantization: how the frozen OFT model loads.
        save_steps, eval_steps, eval_batches, log_steps, keep_checkpoints: bookkeeping.
        seed: data order, augmentation, initialisation and dropout.
        resume: continue from the newest checkpoint in ``out/checkpoints``.
        write_to_model: also write the final files beside the OFT model's head (a local directory).
        overwrite: replace an energy model already in the OFT model's directory.
    """

    model: str = ""
    data_dir: str = ""
    dataset_name: str = ""
    out: str = "runs/energy"
    unnorm_key: str | None = None
    max_steps: int = 2000
    batch_size: int = 24
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    temperature: float = 0.5
    hidden_dim: int = 512
    num_heads: int = 8
    dropout: float = 0.2
    image_aug: bool = False
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    save_steps: int = 500
    eval_steps: int = 500
    eval_batches: int = 4
    log_steps: int = 10
    keep_checkpoints: int = 2
    seed: int = 7
    resume: bool = False
    write_to_model: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.model or not self.data_dir or not self.dataset_name:
            raise ValueError("model, data_dir and dataset_name are required")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives); got {self.batch_size}")
        if self.max_steps < 1 or self.save_steps < 1 or self.log_steps < 1 or self.keep_checkpoints < 1:
            raise ValueError("max_steps, save_steps, log_steps and keep_checkpoints must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("learning_rate must be > 0, warmup_steps and max_grad_norm >= 0")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pair_metrics(energies: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Returns the InfoNCE loss, E_pos, E_neg and the retrieval accuracy of a [B, B] energy matrix.

    Row i is context i, column j chunk j; the true pairs are on the diagonal.
    """
    batch = energies.shape[0]
    labels = torch.arange(batch, device=energies.device)
    loss = torch.nn.functional.cross_entropy(-energies / temperature, labels)
    diagonal = torch.eye(batch, dtype=torch.bool, device=energies.device)
    return {
        "loss": loss,
        "energy_positive": energies[diagonal].mean(),
        "energy_negative": energies[~diagonal].mean(),
        "retrieval_accuracy": (energies.argmin(dim=1) == labels).float().mean(),
    }


class MetricSums:
    """Means of the :func:`pair_metrics` values over several batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.count += 1

    def summary(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}


class EnergyTrainer:
    """One energy training run; ``run()`` trains, checkpoints and writes the energy files."""

    def __init__(self, config: EnergyTrainingConfig) -> None:
        self.config = config
        self.out = config.out_dir
        self.device = resolve_device(config.device)
        self.model_dir = resolve_checkpoint_dir(config.model)
        model_config = read_config(self.model_dir)
        if not is_oft_checkpoint(self.model_dir, model_config):
            raise TrainingError(
                f"{config.model} is not an OpenVLA-OFT model: the energy model scores OFT chunks; fine-tune one "
                "first (training/finetune.py --action-head l1)"
            )
        self.target_dir = self.model_dir if config.write_to_model and Path(config.model).is_dir() else None
        if self.target_dir is not None and (self.target_dir / ENERGY_NAME).exists() and not config.overwrite:
            raise TrainingError(
                f"{self.target_dir / ENERGY_NAME} exists; pass --overwrite to replace it, or --no-write-to-model"
            )
        key = config.unnorm_key or (config.dataset_name if config.dataset_name in model_config.norm_stats
                                    else default_unnorm_key(model_config))
        try:
            self.unnorm_key = select_unnorm_key(model_config.norm_stats, key)
        except OpenVLAError as exc:
            raise TrainingError(f"the OFT model's action statistics: {exc}") from exc
        self.oft = load_oft_model(self.model_dir, dtype=config.dtype, device=str(self.device),
                                  quantization=config.quantization, config=model_config)
        self.spec = self.oft.spec
        builder = open_rlds(config.data_dir, config.dataset_name)
        tokenizer = load_tokenizer(self.model_dir)
        settings = read_image_settings(self.model_dir, model_config)
        statistics = model_config.norm_stats[self.unnorm_key]
        self.samples = ChunkSampleBuilder(tokenizer, statistics, self.spec, settings, config.image_aug, self.unnorm_key)
        self.eval_samples = ChunkSampleBuilder(tokenizer, statistics, self.spec, settings, False, self.unnorm_key)
        self.train_windows = check_chunk_data(load_frames(builder, "train"), self.spec, "train")
        val = load_frames(builder, "val") if "val" in builder.info.splits else []
        self.val_windows = check_chunk_data(val, self.spec, "val") if val else []
        if len(self.train_windows) < config.batch_size:
            raise TrainingError(
                f"the train split has {len(self.train_windows)} windows, fewer than --batch-size {config.batch_size}"
            )
        self.pad_token_id = model_config.text_config.pad_token_id or 32000
        torch.manual_seed(config.seed)
        self.energy_spec = EnergySpec(context_dim=model_config.text_config.hidden_size, action_dim=self.spec.action_dim,
                                      chunk=self.spec.chunk, hidden_dim=config.hidden_dim, num_heads=config.num_heads,
                                      dropout=config.dropout)
        self.energy = EnergyModel(self.energy_spec).to(self.device)
        self.optimizer = torch.optim.AdamW(self.energy.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.step = 0
        self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    # ----------------------------------------------------------------------------------- data
    def _batch(self, step: int) -> ChunkBatch:
        size, count = self.config.batch_size, len(self.train_windows)
        samples = []
        for number in range(step * size, (step + 1) * size):
            epoch, position = divmod(number, count)
            if self._order[0] != epoch:
                self._order = (epoch, epoch_order(count, self.config.seed, epoch))
            window = self.train_windows[int(self._order[1][position])]
            samples.append(self.samples(window, sample_rng(self.config.seed, number)))
        return collate_chunks(samples, self.spec, self.pad_token_id).to(self.device)

    @torch.no_grad()
    def _context(self, batch: ChunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the frozen model's hidden states [B, S, D] (float32) and their visible mask [B, S]."""
        hidden, key_mask, num_prefix = self.oft.sequence_hidden_states(batch.inputs, batch.pixel_values, batch.proprio)
        return hidden.float(), energy_context_mask(key_mask, batch.inputs.prompt_lengths, num_prefix)

    def _metrics(self, batch: ChunkBatch) -> dict[str, torch.Tensor]:
        hidden, visible = self._context(batch)
        encoded = self.energy.encode_context(hidden)
        matrix = self.energy.energy_matrix(encoded, visible, batch.actions.float())
        return pair_metrics(matrix, self.config.temperature)

    # ------------------------------------------------------------------------------- training
    def run(self) -> dict[str, dict[str, float]]:
        """Trains to ``max_steps`` and writes the energy files; returns the last train (and val) metrics.

        Raises:
            TrainingError: checkpoints already in ``out`` without ``resume``, a non-finite loss, or an
                unreadable checkpoint.
        """
        config = self.config
        remove_stale_checkpoint_staging(self.out)  # what a killed run left half-written
        if config.resume:
            self._resume()
        elif self._checkpoints():
            raise TrainingError(
                f"{self.out / 'checkpoints'} already holds checkpoints; pass --resume to continue that run or "
                "choose a new --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "energy_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        last: dict[str, dict[str, float]] = {}
        window = MetricSums()
        self.energy.train()
        while self.step < config.max_steps:
            values = self._metrics(self._batch(self.step))
            if not torch.isfinite(values["loss"]):
                raise TrainingError(
                    f"the energy loss is not finite at step {self.step}; lower --learning-rate or resume from the "
                    "last checkpoint"
                )
            self.optimizer.zero_grad(set_to_none=True)
            values["loss"].backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.energy.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            window.add(values)
            if self.step % config.log_steps == 0 or self.step == config.max_steps:
                last["train"] = window.summary()
                self._log("train", last["train"])
                window = MetricSums()
            if config.eval_steps and self.val_windows and (
                self.step % config.eval_steps == 0 or self.step == config.max_steps
            ):
                last["val"] = self.evaluate()
                self._log("val", last["val"])
            if self.step % config.save_steps == 0 and self.step < config.max_steps:
                self._save_checkpoint()
        self._save_checkpoint()
        self._write_outputs()
        return last

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Returns the mean pair metrics (eval mode) over the first ``eval_batches`` full batches of ``val``."""
        self.energy.eval()
        sums = MetricSums()
        size = self.config.batch_size
        for start in range(0, min(len(self.val_windows), size * self.config.eval_batches), size):
            windows = self.val_windows[start:start + size]
            if len(windows) < 2:
                break
            batch = collate_chunks([self.eval_samples(w, None) for w in windows], self.spec, self.pad_token_id)
            sums.add(self._metrics(batch.to(self.device)))
        self.energy.train()
        return sums.summary()

    def _log(self, split: str, values: dict[str, float]) -> None:
        learning_rate = self.scheduler.get_last_lr()[0]
        logger.info("step %d %s: %s", self.step, split, "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        with open(self.out / "metrics.jsonl", "a") as stream:
            stream.write(json.dumps({"step": self.step, "split": split, **values, "learning_rate": learning_rate})
                         + "\n")

    # ---------------------------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        return list_checkpoints(self.out)

    def _save_checkpoint(self) -> None:
        """Writes the energy weights, optimiser, scheduler, step and RNG states atomically; prunes old ones."""
        def write(directory: Path) -> None:
            save_energy_model(self.energy, directory, {"steps": self.step})
            torch.save(training_state(self.step, self.optimizer, self.scheduler, self.config.to_dict()),
                       directory / STATE_NAME)

        write_checkpoint(self.out, self.step, write, self.config.keep_checkpoints)

    def _resume(self) -> None:
        from safetensors.torch import load_file

        latest = newest_checkpoint(self.out)
        try:
            state = torch.load(latest / STATE_NAME, map_location="cpu", weights_only=False)
            weights = load_file(str(latest / ENERGY_NAME))
        except Exception as exc:  # torch and safetensors raise several types for damaged files
            raise TrainingError(f"checkpoint {latest} is unreadable ({exc}); remove it to resume from the one before") from exc
        saved = state.get("config", {})
        changed = [name for name in ("hidden_dim", "num_heads", "batch_size", "seed", "temperature")
                   if name in saved and saved[name] != getattr(self.config, name)]
        if changed:
            raise TrainingError(
                f"checkpoint {latest} was written with other {', '.join(changed)}; resume with the same settings"
            )
        try:
            load_component_state(self.energy, weights, str(latest / ENERGY_NAME))
        except OpenVLAError as exc:
            raise TrainingError(str(exc)) from exc
        self.step = restore_training_state(state, self.optimizer, self.scheduler)
        logger.info("resumed from %s at step %d", latest, self.step)

    def _write_outputs(self) -> None:
        info = {"steps": self.step, "dataset_name": self.config.dataset_name, "unnorm_key": self.unnorm_key,
                "temperature": self.config.temperature}
        save_energy_model(self.energy, self.out / "energy", info)
        if self.target_dir is not None:
            save_energy_model(self.energy, self.target_dir, info)
            logger.info("energy model written beside the head in %s", self.target_dir)
        else:
            logger.info("energy model in %s; copy both files beside the OFT model's head to use it",
                        self.out / "energy")


def run_energy_training(config: EnergyTrainingConfig) -> dict[str, dict[str, float]]:
    """Runs an energy training and returns its last metrics.

    Raises:
        OpenVLAError: (DatasetError, CheckpointError, TrainingError, ...) with the problem and the way out.
    """
    return EnergyTrainer(config).run()
