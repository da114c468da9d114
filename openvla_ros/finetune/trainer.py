"""The fine-tuning loop: LoRA/QLoRA, gradient accumulation, checkpoints that resume exactly, DDP.

Run layout in ``config.out``::

    finetune_config.yaml       settings of the run
    checkpoints/step-000500/   adapter/ + training_state.pt (optimizer, scheduler, step, RNG)
    tensorboard/               scalars
    adapter/                   final LoRA adapter (loadable with ``adapter=``)
    merged/                    base + adapter merged into full precision: a checkpoint the node loads
    dataset_statistics.json    {dataset_name: statistics}

With ``action_head: l1`` (OpenVLA-OFT) the VLA gets LoRA as above while the L1 action head, the proprio
projector and FiLM are trained fully; their weights go into each checkpoint's ``heads/`` and into
``merged/`` as safetensors beside the merged VLA (our OFT layout, loaded by the node as it is).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from openvla_ros.errors import TrainingError
from openvla_ros.finetune.checkpoints import (
    list_checkpoints,
    newest_checkpoint,
    recover_model_swap,
    remove_stale_checkpoint_staging,
    restore_training_state,
    training_state,
    write_checkpoint,
)
from openvla_ros.finetune.chunks import ChunkMetrics, ChunkSampleBuilder, check_chunk_data, collate_chunks
from openvla_ros.finetune.config import DEFAULT_CHUNK, FinetuneConfig
from openvla_ros.finetune.data import (
    Frame,
    SampleBuilder,
    collate,
    epoch_order,
    load_frames,
    load_statistics,
    open_rlds,
    sample_rng,
)
from openvla_ros.finetune.ema import WeightAverage
from openvla_ros.finetune.selection import ClosedLoopSelection, SelectionPoint
from openvla_ros.interrupts import remove_stale_staging
from openvla_ros.model.action_codec import ACTION_DIM
from openvla_ros.model.loading import (
    fresh_directory,
    load_model,
    load_tokenizer,
    read_config,
    read_image_settings,
    resolve_checkpoint_dir,
    save_checkpoint,
    staging_prefix,
)
from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction
from openvla_ros.model.oft import OFTSpec, OpenVLAOFT
from openvla_ros.model.oft_loading import (
    is_oft_checkpoint,
    load_component_state,
    load_oft_model,
    oft_state_files,
    save_oft_checkpoint,
)
from openvla_ros.model.policy import attach_adapter
from openvla_ros.model.processor import ImageSettings

logger = logging.getLogger(__name__)

FULL_WEIGHTS = "model.safetensors"  # a full fine-tune's checkpoint weights (LoRA runs keep adapter/)
AUXILIARY_WEIGHTS = "auxiliary.pt"  # a checkpoint's auxiliary-loss heads (Trainer(auxiliary=...))
EMA_WEIGHTS = "weight_average.pt"  # a checkpoint's average of the trainable weights (ema_decay > 0)
ADAPTER_STAGING_PREFIX = ".adapter-"  # adapter/ is written here first, then renamed
# merged/ is saved as .merged-new (itself staged by save_checkpoint) and swapped in via .merged-old
MERGED_DIR, MERGED_NEW, MERGED_OLD = "merged", ".merged-new", ".merged-old"


@dataclass
class DistributedContext:
    """Process-group facts of this process (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> DistributedContext:
    """Joins the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistributedContext(
        rank=torch.distributed.get_rank(), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def lora_target_modules(model: OpenVLAForActionPrediction) -> list[str]:
    """Returns the Linear layers LoRA adapts: all that the forward uses, except lm_head.

    Skipped because the forward never runs them: each ViT's last block (features come from the
    second-to-last) and SigLIP's attention-pool head.
    """
    unused = []
    for vit_name in ("featurizer", "fused_featurizer"):
        vit = getattr(model.vision_backbone, vit_name)
        if vit is not None:
            unused.append(f"vision_backbone.{vit_name}.blocks.{len(vit.blocks) - 1}.")
            unused.append(f"vision_backbone.{vit_name}.attn_pool.")
    names = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and name != "language_model.lm_head" and not name.startswith(tuple(unused)):
            names.append(name)
    return names


def load_base(config: FinetuneConfig, checkpoint_dir: Path, device: str, quantization: str | None = None,
              dtype: str | None = None) -> tuple[OpenVLAForActionPrediction, OpenVLAOFT | None]:
    """Returns the base VLA, and with ``action_head: l1`` and an OFT base also its OFT model (heads loaded).

    An OFT base loads through the OFT loader, so a FiLM checkpoint's vision weights are the merged ones.
    """
    quantization = config.quantization if quantization is None else quantization
    dtype = config.dtype if dtype is None else dtype
    if config.action_head == "l1" and is_oft_checkpoint(checkpoint_dir, read_config(checkpoint_dir)):
        oft = load_oft_model(checkpoint_dir, dtype=dtype, device=device, quantization=quantization)
        return oft.vla, oft
    return load_model(checkpoint_dir, dtype=dtype, device=device, quantization=quantization), None


def add_lora(base: OpenVLAForActionPrediction, config: FinetuneConfig):
    """Returns a peft model with fresh LoRA weights on ``base`` (modified in place).

    With ``lora_rank: 0`` it returns ``base`` itself with every weight trainable (full fine-tuning).
    """
    from peft import LoraConfig, get_peft_model

    if config.lora_rank == 0:
        base.requires_grad_(True)
        if config.gradient_checkpointing:
            base.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return base
    for module in base.modules():
        # bitsandbytes' CPU 4-bit path repacks weights in place after any no-grad forward, which breaks
        # later gradients; training never uses that path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(base),
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, lora)
    if config.gradient_checkpointing:
        base.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_trainable_model(config: FinetuneConfig, checkpoint_dir: Path, device: str):
    """Returns a peft model with fresh LoRA weights on the (optionally quantised) base."""
    base, _ = load_base(config, checkpoint_dir, device)
    return add_lora(base, config)


def chunk_spec(config: FinetuneConfig, base_oft: OpenVLAOFT | None, state_dim: int | None) -> OFTSpec:
    """Returns the OFT layout to train: the base's when it is an OFT model, else the one the options ask for.

    Raises:
        TrainingError: options that contradict an OFT base, or --use-proprio on a dataset without state.
    """
    if base_oft is not None:
        spec = base_oft.spec
        conflicts = []
        if config.chunk and config.chunk != spec.chunk:
            conflicts.append(f"--chunk {config.chunk} (the base has {spec.chunk})")
        if config.use_proprio != bool(spec.proprio_dim):
            conflicts.append(f"--use-proprio {config.use_proprio} (the base {'has' if spec.proprio_dim else 'has no'} "
                             "proprio projector)")
        if config.num_images != spec.num_images:
            conflicts.append(f"--num-images {config.num_images} (the base takes {spec.num_images})")
        if config.film != spec.film:
            conflicts.append(f"--film {config.film} (the base {'uses' if spec.film else 'has no'} FiLM)")
        if conflicts:
            raise TrainingError(
                "fine-tuning an OFT model keeps its heads, so its layout cannot change: " + "; ".join(conflicts)
                + ". Match these options to the base, or start from a token-head OpenVLA checkpoint"
            )
        return spec
    proprio_dim = 0
    if config.use_proprio:
        if state_dim is None:
            raise TrainingError(
                "--use-proprio needs observation/state in the dataset; record the robot state "
                "(topics.state in the conversion config) or drop --use-proprio"
            )
        proprio_dim = state_dim
    return OFTSpec(chunk=config.chunk or DEFAULT_CHUNK, action_dim=ACTION_DIM, proprio_dim=proprio_dim,
                   num_images=config.num_images, film=config.film)


def trainable_heads(network: OpenVLAOFT, device: torch.device) -> None:
    """Makes the head and proprio projector (float32: they cast their inputs) and FiLM (in the vision
    dtype) of ``network`` trainable on ``device``."""
    for module in (network.action_head, network.proprio_projector):
        if module is not None:
            module.to(device=device, dtype=torch.float32).requires_grad_(True)
    if network.film is not None:
        vision_dtype = network.vla.vision_backbone.featurizer.patch_embed.proj.weight.dtype
        network.film.to(device=device, dtype=vision_dtype).requires_grad_(True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Returns warmup followed by constant, linear or cosine decay."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class BatchMetrics:
    """Sums over a set of batches: loss, action-token accuracy, L1 in normalised and physical units."""

    loss_sum: float = 0.0
    batches: int = 0
    correct: int = 0
    tokens: int = 0
    l1_normalized: list[float] = field(default_factory=list)
    l1_physical: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        physical = np.concatenate(self.l1_physical) if self.l1_physical else np.zeros((0, ACTION_DIM))
        return {
            "loss": self.loss_sum / max(1, self.batches),
            "action_accuracy": self.correct / max(1, self.tokens),
            "l1_normalized": float(np.mean(self.l1_normalized)) if self.l1_normalized else float("nan"),
            "l1_physical": float(physical.mean()) if physical.size else float("nan"),
        }


def update_metrics(metrics: BatchMetrics, logits: torch.Tensor, targets: torch.Tensor, loss: float,
                   samples: SampleBuilder) -> None:
    """Adds one batch from the labelled-position ``logits`` [N, V] and ``targets`` [N] of the model."""
    predicted = logits.argmax(dim=-1)
    first, last = samples.action_tokenizer.first_action_id, samples.action_tokenizer.last_action_id
    mask = (targets >= first) & (targets <= last)
    metrics.loss_sum += loss
    metrics.batches += 1
    metrics.correct += int((predicted[mask] == targets[mask]).sum())
    metrics.tokens += int(mask.sum())
    predicted_ids = predicted[mask].view(-1, ACTION_DIM).cpu().numpy()
    gold_ids = targets[mask].view(-1, ACTION_DIM).cpu().numpy()
    predicted_norm = samples.action_tokenizer.decode(predicted_ids)
    gold_norm = samples.action_tokenizer.decode(gold_ids)
    metrics.l1_normalized.append(float(np.abs(predicted_norm - gold_norm).mean()))
    physical = samples.normalizer.unnormalize(predicted_norm) - samples.normalizer.unnormalize(gold_norm)
    metrics.l1_physical.append(np.abs(physical).reshape(-1))


class Trainer:
    """One fine-tuning run; ``run()`` trains, checkpoints and writes the outputs."""

    def __init__(self, config: FinetuneConfig, selection: ClosedLoopSelection | None = None,
                 auxiliary: Callable[[OpenVLAOFT, Any, ImageSettings], nn.Module] | None = None) -> None:
        """``selection``: closed-loop validation during training; the best weights are the ones written.

        ``auxiliary`` (OFT head only): called with the model, tokenizer and image settings, it returns a
        module whose ``forward(pixel_values, input_ids, prompt_lengths, internals)`` is a loss added to the
        action loss in training (never in validation). Its parameters train with the same optimizer and
        schedule, are kept in checkpoints (``auxiliary.pt``) and are not part of the model written.
        """
        self.config = config
        self.selection = selection
        self.out = config.out_dir
        self.checkpoint_dir = resolve_checkpoint_dir(config.vla_path)
        from openvla_ros.model.loading import resolve_device

        device = resolve_device(config.device)
        self.dist = init_distributed(device)
        if device.type == "cuda" and self.dist.world_size > 1:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        builder = open_rlds(config.data_dir, config.dataset_name)
        self.statistics = load_statistics(builder, config.dataset_name)
        self.train_frames: list[Frame] = load_frames(builder, "train")
        self.val_frames: list[Frame] = load_frames(builder, "val") if "val" in builder.info.splits else []
        self.tokenizer = load_tokenizer(self.checkpoint_dir)
        self.chunked = config.action_head == "l1"
        self.full = config.lora_rank == 0
        vla, base_oft = load_base(config, self.checkpoint_dir, str(device))
        self.model = add_lora(vla, config)
        # The base checkpoint's preprocessor settings, exactly as the policy will apply them.
        self.image_settings = read_image_settings(self.checkpoint_dir, read_config(self.checkpoint_dir))
        self.samples = SampleBuilder(self.tokenizer, self.statistics, self.image_settings, config.image_aug)
        self.eval_samples = SampleBuilder(self.tokenizer, self.statistics, self.image_settings, False)
        self.pad_token_id = vla.config.text_config.pad_token_id or 32000
        self.network: nn.Module = self.model
        self.train_items: list = self.train_frames
        self.val_items: list = self.val_frames
        if self.chunked:
            state = self.train_frames[0].state
            self.spec = chunk_spec(config, base_oft, None if state is None else int(state.size))
            if base_oft is None:
                torch.manual_seed(config.seed + 1)
                base_oft = OpenVLAOFT(vla, self.spec)
            self.network = base_oft
            trainable_heads(self.network, device)
            self.samples = ChunkSampleBuilder(self.tokenizer, self.statistics, self.spec, self.image_settings,
                                              config.image_aug, config.dataset_name)
            self.eval_samples = ChunkSampleBuilder(self.tokenizer, self.statistics, self.spec, self.image_settings,
                                                   False, config.dataset_name)
            self.train_items = check_chunk_data(self.train_frames, self.spec, "train")
            self.val_items = check_chunk_data(self.val_frames, self.spec, "val") if self.val_frames else []
            logger.info("OFT fine-tuning: chunk %d, %d-D actions, proprio %d, %d image(s), FiLM %s; %d train windows",
                        self.spec.chunk, self.spec.action_dim, self.spec.proprio_dim, self.spec.num_images,
                        self.spec.film, len(self.train_items))
        # by name, built once: the same parameter objects for the whole run (updated in place)
        self._trainable_by_name = {name: p for name, p in self.network.named_parameters() if p.requires_grad}
        self.trainable = list(self._trainable_by_name.values())
        self.auxiliary: nn.Module | None = None
        groups: list[dict[str, Any]] = [{"params": self.trainable}]
        if auxiliary is not None:
            if not self.chunked:
                raise TrainingError("an auxiliary loss needs the OFT chunk head (action_head 'l1')")
            self.auxiliary = auxiliary(self.network, self.tokenizer, self.image_settings).to(device)
            groups.append({"params": list(self.auxiliary.parameters())})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.average = WeightAverage(self.trainable_state(), config.ema_decay) if config.ema_decay else None
        self.step = 0
        self._auxiliary_sum, self._auxiliary_batches = 0.0, 0
        self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))
        self.forward_model: nn.Module = self.network
        if self.dist.world_size > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.full,  # a full fine-tune holds weights the forward never uses
            )

    # ----------------------------------------------------------------------------------- data
    def _collate(self, samples: list) -> Any:
        if self.chunked:
            return collate_chunks(samples, self.spec, self.pad_token_id).to(self.device)
        return {key: value.to(self.device) for key, value in collate(samples, self.pad_token_id).items()}

    def _batch(self, step: int, micro: int) -> Any:
        config, world = self.config, self.dist.world_size
        first = ((step * config.grad_accumulation_steps + micro) * world + self.dist.rank) * config.batch_size
        samples = []
        count = len(self.train_items)
        for number in range(first, first + config.batch_size):
            epoch, position = divmod(number, count)
            if self._order[0] != epoch:
                self._order = (epoch, epoch_order(count, config.seed, epoch))
            item = self.train_items[int(self._order[1][position])]
            samples.append(self.samples(item, sample_rng(config.seed, number)))
        return self._collate(samples)

    def _new_metrics(self) -> BatchMetrics | ChunkMetrics:
        return ChunkMetrics() if self.chunked else BatchMetrics()

    def _loss(self, model: nn.Module, batch: Any, metrics, samples) -> torch.Tensor:
        """Returns the loss of one batch and adds the batch to ``metrics``."""
        if self.chunked:
            auxiliary = self.auxiliary if torch.is_grad_enabled() else None
            if auxiliary is None:
                predicted = model(batch.inputs, batch.pixel_values, batch.proprio)
            else:
                internals = model(batch.inputs, batch.pixel_values, batch.proprio, internals=True)
                predicted = internals.chunk
            loss = torch.nn.functional.l1_loss(predicted, batch.actions)
            metrics.add(predicted, batch.actions, loss.item(), samples)
            if auxiliary is not None:
                extra = auxiliary(batch.pixel_values, batch.inputs.input_ids, batch.inputs.prompt_lengths, internals)
                self._auxiliary_sum += extra.item()
                self._auxiliary_batches += 1
                loss = loss + extra
            return loss
        output = model(**batch)
        update_metrics(metrics, output.logits.detach(), output.targets, output.loss.item(), samples)
        return output.loss

    # ------------------------------------------------------------------------------ training
    def run(self) -> dict[str, Any]:
        """Trains to ``max_steps`` and writes the outputs; returns the last train/val metrics."""
        from tqdm import tqdm

        config = self.config
        if self.dist.is_main:  # what a killed run (SIGKILL, power loss) left half-written
            remove_stale_checkpoint_staging(self.out)
            remove_stale_staging(self.out, f"{ADAPTER_STAGING_PREFIX}*")
            remove_stale_staging(self.out, f"{staging_prefix(self.out / MERGED_NEW)}*")
            recover_model_swap(self.out, MERGED_DIR, MERGED_NEW, MERGED_OLD)
        if config.resume:
            self._resume()
            if self.selection is not None:
                self.selection.restore(self.step)
        elif self._checkpoints():
            raise TrainingError(
                f"{self.out / 'checkpoints'} already holds checkpoints; pass --resume to continue that run "
                "or choose a new --out"
            )
        writer = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "finetune_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        progress = tqdm(total=config.max_steps, initial=self.step, disable=not self.dist.is_main, desc="finetune")
        last: dict[str, Any] = {}
        window = self._new_metrics()
        self.network.train()
        try:
            while self.step < config.max_steps:
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(config.grad_accumulation_steps):
                    loss = self._loss(self.forward_model, self._batch(self.step, micro), window, self.samples)
                    (loss / config.grad_accumulation_steps).backward()
                if self.auxiliary is not None and self.dist.world_size > 1:  # outside the DDP wrapper: average by hand
                    for parameter in self.auxiliary.parameters():
                        if parameter.grad is None:  # a batch that added nothing still takes part
                            parameter.grad = torch.zeros_like(parameter)
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad /= self.dist.world_size
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
                    if self.auxiliary is not None:
                        torch.nn.utils.clip_grad_norm_(self.auxiliary.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                if self.average is not None:
                    self.average.update(self.trainable_state(), self.step)
                progress.update(1)
                if self.step % config.log_steps == 0 or self.step == config.max_steps:
                    last["train"] = window.summary()
                    if self._auxiliary_batches:
                        last["train"]["auxiliary_loss"] = self._auxiliary_sum / self._auxiliary_batches
                        self._auxiliary_sum, self._auxiliary_batches = 0.0, 0
                    self._log("train", last["train"], writer)
                    shown = {"loss": f"{last['train']['loss']:.3f}"}
                    if "action_accuracy" in last["train"]:
                        shown["acc"] = f"{last['train']['action_accuracy']:.2f}"
                    progress.set_postfix(**shown)
                    window = self._new_metrics()
                validate_now = self.selection is not None and self.selection.due(self.step, config.max_steps)
                if self.val_items and (validate_now or (config.eval_steps and (
                    self.step % config.eval_steps == 0 or self.step == config.max_steps
                ))):
                    last["val"] = self.evaluate()
                    self._log("val", last["val"], writer)
                if validate_now and self.dist.is_main:
                    self._select(last.get("val", {}), writer)
                if self.step % config.save_steps == 0 and self.step < config.max_steps:
                    self._save_checkpoint()
        except torch.cuda.OutOfMemoryError as exc:
            raise TrainingError(
                f"out of GPU memory at batch size {config.batch_size}: lower --batch-size and raise "
                "--grad-accumulation-steps, or use --quantization 4bit and --gradient-checkpointing"
            ) from exc
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        self._save_checkpoint()
        if self.selection is not None and self.selection.best_state is not None:
            self._load_trainable(self.selection.best_state)  # the checkpoint above keeps the last state
            last["selected"] = self.selection.as_dict()
            logger.info("kept the weights of step %d: %d/%d validation episodes", self.selection.best.step,
                        self.selection.best.successes, self.selection.best.episodes)
        elif self.average is not None:
            self.average.copy_to(self.trainable_state())  # the average is what the run writes
        if self.dist.is_main:
            self._write_outputs()
        self.dist.barrier()
        return last

    # ------------------------------------------------------------------------------ selection
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights training changes (LoRA and heads, or every weight of a full fine-tune), by name."""
        return dict(self._trainable_by_name)

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        current = self.trainable_state()
        if set(state) != set(current):
            raise TrainingError("the kept weights do not match the model's trainable weights; remove "
                                f"{self.out / 'selection_best.pt'} and train again")
        with torch.no_grad():
            for name, tensor in current.items():
                tensor.copy_(state[name].to(tensor.device, tensor.dtype))

    def policy(self) -> Any:
        """A policy on the current weights (no copy), with this dataset's statistics, for closed-loop validation."""
        from openvla_ros.model.oft_policy import OFTPolicy
        from openvla_ros.model.policy import OpenVLAPolicy

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        config = self.network.config if self.chunked else model.config
        config.norm_stats = {**config.norm_stats, self.config.dataset_name: self.statistics}
        if self.chunked:
            return OFTPolicy(self.network, self.tokenizer, unnorm_key=self.config.dataset_name,
                             center_crop=self.config.image_aug, image_settings=self.image_settings)
        return OpenVLAPolicy(model, self.tokenizer, unnorm_key=self.config.dataset_name,
                             center_crop=self.config.image_aug, image_settings=self.image_settings)

    def averaged(self) -> contextlib.AbstractContextManager:
        """A block in which the trainable weights are their running average (ema_decay > 0), else as trained."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.swapped_in(self.trainable_state())

    def _select(self, val: dict[str, float], writer) -> None:
        self.network.eval()
        with self.averaged():  # what the run would write now
            try:
                successes, episodes = self.selection.evaluate(self.policy())
            finally:
                self.network.train()
            val_l1 = val.get("l1_normalized", val.get("l1"))
            point = SelectionPoint(self.step, int(successes), int(episodes),
                                   None if val_l1 is None else float(val_l1))
            kept = self.selection.consider(point, self.trainable_state)
        logger.info("step %d select: success %d/%d%s", self.step, successes, episodes, " (best so far)" if kept else "")
        if writer is not None:
            writer.add_scalar("select/success_rate", point.rate, self.step)

    def _log(self, split: str, values: dict[str, float], writer) -> None:
        if not self.dist.is_main:
            return
        text = "  ".join(f"{key} {value:.4f}" for key, value in values.items())
        logger.info("step %d %s: %s", self.step, split, text)
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"{split}/{key}", value, self.step)
            writer.add_scalar("train/learning_rate", self.scheduler.get_last_lr()[0], self.step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Returns loss and L1 (and action accuracy for the token head) on the first ``eval_batches`` batches of ``val``.

        With ``ema_decay`` > 0 it evaluates the weight average, the weights the run writes.
        """
        self.network.eval()
        metrics = self._new_metrics()
        size = self.config.batch_size
        with self.averaged():
            for start in range(0, min(len(self.val_items), size * self.config.eval_batches), size):
                samples = [self.eval_samples(item, None) for item in self.val_items[start:start + size]]
                self._loss(self.network, self._collate(samples), metrics, self.eval_samples)
        self.network.train()
        return metrics.summary()

    # ---------------------------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        return list_checkpoints(self.out)

    def _save_checkpoint(self) -> None:
        """Writes adapter + optimizer/scheduler/step/RNG atomically (rank 0) and prunes old ones."""
        if self.dist.is_main:
            def write(directory: Path) -> None:
                self._save_weights(directory)
                if self.chunked:
                    self._save_heads(directory / "heads")
                torch.save(training_state(self.step, self.optimizer, self.scheduler, self.config.to_dict()),
                           directory / "training_state.pt")
                if self.average is not None:
                    torch.save(self.average.state_dict(), directory / EMA_WEIGHTS)
                if self.auxiliary is not None:
                    torch.save(self.auxiliary.state_dict(), directory / AUXILIARY_WEIGHTS)

            write_checkpoint(self.out, self.step, write, self.config.keep_checkpoints)
        self.dist.barrier()

    def _resume(self) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        latest = newest_checkpoint(self.out)
        try:
            state = torch.load(latest / "training_state.pt", map_location="cpu", weights_only=False)
            if self.full:
                weights = load_file(str(latest / FULL_WEIGHTS))
            else:
                weights = load_file(str(latest / "adapter" / "adapter_model.safetensors"))
        except Exception as exc:  # torch/safetensors raise several types for damaged files
            raise TrainingError(f"checkpoint {latest} is unreadable ({exc}); remove it to resume from the one before") from exc
        if self.full:
            result = self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=False)
            if result.unexpected_keys or set(result.missing_keys) - set(self._tied_names()):
                raise TrainingError(f"checkpoint {latest} does not fit this model: missing "
                                    f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
        else:
            result = set_peft_model_state_dict(self.model, weights)
            if getattr(result, "unexpected_keys", None):
                raise TrainingError(f"checkpoint {latest} does not fit this model: unexpected {result.unexpected_keys[:3]}")
        if self.chunked:
            self._load_heads(latest / "heads")
        if self.auxiliary is not None:
            saved = latest / AUXILIARY_WEIGHTS
            if not saved.is_file():
                raise TrainingError(f"{latest} holds no auxiliary-loss weights ({AUXILIARY_WEIGHTS}): it was written "
                                    "without the auxiliary loss; resume without it or start a new run with a new --out")
            self.auxiliary.load_state_dict(torch.load(saved, map_location=self.device, weights_only=True))
        self.step = restore_training_state(state, self.optimizer, self.scheduler)
        if self.average is not None:
            saved = latest / EMA_WEIGHTS
            if not saved.is_file():
                raise TrainingError(f"{latest} holds no weight average ({EMA_WEIGHTS}): it was written with ema_decay "
                                    "0; resume with --ema-decay 0 or start a new run with a new --out")
            try:
                self.average.load_state_dict(torch.load(saved, map_location=self.device, weights_only=True))
            except ValueError as exc:
                raise TrainingError(f"{saved}: {exc}; start a new run with a new --out") from exc
        logger.info("resumed from %s at step %d", latest, self.step)

    def _tied_names(self) -> list[str]:
        """Returns the names of parameters that share storage with an earlier one (not saved twice)."""
        seen: dict[int, str] = {}
        tied = []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            key = tensor.data_ptr()
            if key in seen:
                tied.append(name)
            else:
                seen[key] = name
        return tied

    def _save_weights(self, staging: Path) -> None:
        """Writes the adapter (LoRA) or every weight (full fine-tuning) of the run into ``staging``."""
        if not self.full:
            self.model.save_pretrained(str(staging / "adapter"))
            return
        from safetensors.torch import save_file

        tied = set(self._tied_names())
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items() if k not in tied}
        save_file(state, str(staging / FULL_WEIGHTS))

    def _save_heads(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True)
        for name, state in oft_state_files(self.network).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / name))

    def _load_heads(self, directory: Path) -> None:
        from safetensors.torch import load_file

        for name in oft_state_files(self.network):
            path = directory / name
            try:
                state = load_file(str(path))
            except Exception as exc:  # missing or damaged file
                raise TrainingError(
                    f"checkpoint {directory.parent} has no readable {path.name} ({exc}); remove that checkpoint "
                    "to resume from the one before"
                ) from exc
            module = {"action_head.safetensors": self.network.action_head,
                      "proprio_projector.safetensors": self.network.proprio_projector,
                      "film.safetensors": self.network.film}[name]
            load_component_state(module, state, str(path))

    # -------------------------------------------------------------------------------- outputs
    def _write_outputs(self) -> None:
        """Writes adapter/ (LoRA runs), merged/ (full precision base + adapter, or the fully trained
        model) and dataset_statistics.json."""
        statistics = {self.config.dataset_name: self.statistics}
        (self.out / "dataset_statistics.json").write_text(json.dumps(statistics, indent=2))
        if self.full:
            merged = self.model.to("cpu")
        else:
            adapter_dir = self.out / "adapter"
            with fresh_directory(self.out, ADAPTER_STAGING_PREFIX) as staging:  # removed unless renamed
                self.model.save_pretrained(str(staging))
                if adapter_dir.exists():
                    shutil.rmtree(adapter_dir)
                staging.rename(adapter_dir)
            merged_dtype = "float32" if self.device.type == "cpu" else "bfloat16"
            base, _ = load_base(self.config, self.checkpoint_dir, "cpu", quantization="none", dtype=merged_dtype)
            merged = attach_adapter(base, adapter_dir, merge=True)
        merged.config.norm_stats = {**merged.config.norm_stats, **statistics}
        merged.config.extra["openvla_ros"] = {
            "base_model": self.config.vla_path,
            "dataset_name": self.config.dataset_name,
            "trained_with_image_aug": self.config.image_aug,
            "steps": self.step,
            "training": "full" if self.full else f"lora rank {self.config.lora_rank}",
        }
        # Written beside the previous merged model and swapped in at the end, so a failure or Ctrl-C while
        # saving never leaves the run without a loadable merged model.
        merged_dir, fresh, previous = self.out / MERGED_DIR, self.out / MERGED_NEW, self.out / MERGED_OLD
        recover_model_swap(self.out, MERGED_DIR, MERGED_NEW, MERGED_OLD)
        if self.chunked:
            merged_oft = OpenVLAOFT(merged, self.spec)
            for name, module in (("action_head", merged_oft.action_head),
                                 ("proprio_projector", merged_oft.proprio_projector), ("film", merged_oft.film)):
                if module is not None:
                    module.load_state_dict({k: v.detach().cpu() for k, v in
                                            getattr(self.network, name).state_dict().items()})
            save_oft_checkpoint(merged_oft, fresh, tokenizer=self.tokenizer, image_settings=self.image_settings)
        else:
            save_checkpoint(merged, fresh, tokenizer=self.tokenizer, image_settings=self.image_settings)
        # as the official fine-tuning does: the run's own statistics beside the model
        (fresh / "dataset_statistics.json").write_text(json.dumps(statistics, indent=2))
        if merged_dir.exists():
            merged_dir.rename(previous)
        fresh.rename(merged_dir)
        shutil.rmtree(previous, ignore_errors=True)


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Runs a fine-tune and returns its last metrics.

    Raises:
        OpenVLAError: (DatasetError, CheckpointError, TrainingError, ...) with the problem and the way out.
    """
    try:
        return Trainer(config).run()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
