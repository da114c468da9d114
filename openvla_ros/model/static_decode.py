"""Greedy action decoding with a preallocated KV cache: every decode step has the same shapes.

:meth:`~openvla_ros.model.modeling_openvla.OpenVLAForActionPrediction.generate_action_ids` grows its KV
cache by one position per token, so each of the 7 decode steps has new shapes. Here the cache is a
transformers ``StaticCache`` sized for the prompt plus the action tokens and reused while the prompt
length stays the same (the same instruction), so the decode step can be compiled once
(``torch.compile``; on CUDA with ``mode="reduce-overhead"``, which captures it in a CUDA graph).

The ids are those of ``generate_action_ids`` with ``restrict_to_actions`` (the argmax among the action
ids): the same attention over the same keys, with the unwritten cache slots masked out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StaticCache

from openvla_ros.model.modeling_openvla import OpenVLAForActionPrediction


class StaticActionDecoder:
    """Decodes ``num_tokens`` action ids per call with a static KV cache.

    Args:
        model: the VLA (any dtype or quantisation ``generate_action_ids`` takes).
        first_action_id, last_action_id: the action id range the argmax runs over.
        compile_mode: None (eager), or a ``torch.compile`` mode for the decode step ("default",
            "reduce-overhead" for CUDA graphs, "max-autotune").
    """

    def __init__(self, model: OpenVLAForActionPrediction, first_action_id: int, last_action_id: int,
                 num_tokens: int = 7, compile_mode: str | None = None) -> None:
        self.model = model
        self.first_action_id = first_action_id
        self.last_action_id = last_action_id
        self.num_tokens = num_tokens
        self._cache: StaticCache | None = None
        self._cache_key: tuple[int, int] = (-1, -1)  # (length, batch) the cache was built for
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._decode_step
        if compile_mode is not None:
            step = torch.compile(step, mode=compile_mode, fullgraph=False, dynamic=False)
        self._step = step

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, self.first_action_id: self.last_action_id + 1].argmax(dim=-1) + self.first_action_id

    def _decode_step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        output = self.model.language_model(input_ids=ids, past_key_values=self._cache, cache_position=position,
                                           use_cache=True, logits_to_keep=1)
        return self._choose(output.logits)

    def _cache_for(self, length: int, batch: int) -> StaticCache:
        key = (length + self.num_tokens, batch)
        if self._cache is None or self._cache_key != key:
            self._cache = StaticCache(config=self.model.language_model.config, max_cache_len=key[0])
            self._cache_key = key
        else:
            self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns LongTensor [B, num_tokens] of action ids."""
        embeds = self.model.embed_multimodal(input_ids, pixel_values)
        length = embeds.shape[1]
        cache = self._cache_for(length, embeds.shape[0])
        positions = torch.arange(length, device=embeds.device)
        output = self.model.language_model(inputs_embeds=embeds, past_key_values=cache, cache_position=positions,
                                           use_cache=True, logits_to_keep=1)
        ids = self._choose(output.logits)
        generated = [ids]
        for step in range(1, self.num_tokens):
            position = positions[-1:] + step
            ids = self._step(ids[:, None], position).clone()
            generated.append(ids)
        return torch.stack(generated, dim=1)
