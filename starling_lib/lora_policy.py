"""LoRA for the policy: adapters (peft) instead of trained layers, the reference read from the same
weights with the adapters switched off.

The Starling blog names LoRA and full fine-tuning as the next step after training the top 4
layers. `LoraPolicy` puts rank-`r` LoRA adapters on every linear layer of a decoder layer (the
attention and MLP projections, as peft's "all-linear"; not the output head) of the top `layers`
decoder layers, or of all of them, and trains only the adapters and a value head. It has SharedTrunkPolicy's forward, so the
online loop and the evaluation take either:

    policy = LoraPolicy(model, r=16, alpha=32)                  # LoRA on every layer
    out = policy(input_ids, attention_mask, response_start, with_ref=True, with_values=True)

The reference is the initial policy by construction: peft initialises each adapter's B to zero,
and `disable_adapter()` runs the untouched base weights, so there is no second copy of any layer.

Departures and limits:
- no frozen-trunk cache: with adapters in every layer nothing below the top is frozen whole (with
  adapters on the top layers only the trunk could be cached; not done), so each update runs the
  whole model;
- `policy.model` is the causal LM inside peft's wrapper, its projections LoRA layers: the KV-cache
  sampler calls those layers as modules (not through F.linear on their weights), so rollouts run
  the adapters (greedy tokens equal `generate`'s, tested), a little slower per projection; the
  vLLM engines would be sent base weights without the adapters, so the config refuses them;
- the saved policy (`merged`) has the adapters merged into a copy of the weights, a plain
  from_pretrained folder for notebook 05; checkpoints hold the adapters as part of the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from starling_lib.models import decoder_layers, position_ids_from_mask
from starling_lib.rollout import logprobs_from_logits, response_outputs


class LoraPolicy(nn.Module):
    """A causal LM tuned through LoRA adapters, its reference the same weights with them off, and a
    scalar value head on the last hidden state. Only the adapters and the value head train."""

    split = None   # no frozen trunk to cache (SharedTrunkPolicy.split is the first trained layer)

    def __init__(self, model: nn.Module, r: int, alpha: float | None = None, layers: int = -1,
                 value_head: bool = True):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        n = len(decoder_layers(model))
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        if not (layers == -1 or 0 < layers <= n):
            raise ValueError(f"layers must be -1 (all {n}) or 1..{n}, got {layers}")
        # Every linear layer of a decoder layer (q, k, v, o, gate, up, down for Llama / Mistral):
        # peft's "all-linear", named, since it cannot be combined with layers_to_transform.
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in decoder_layers(model)[0].named_modules()
                          if isinstance(m, nn.Linear)})
        config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=0.0,
                            target_modules=linears, bias="none", task_type="CAUSAL_LM",
                            layers_to_transform=None if layers == -1 else list(range(n - layers, n)))
        model.requires_grad_(False)
        self.peft = get_peft_model(model, config)    # the adapters are created trainable, in float32
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)   # the critic starts at zero, as SharedTrunkPolicy's
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(device=model.device, dtype=torch.float32)

    @property
    def model(self) -> nn.Module:
        """The causal LM inside the peft wrapper, its linear layers carrying the adapters: what
        rollouts and evaluations generate with (SharedTrunkPolicy.model's role)."""
        return self.peft.get_base_model()

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask),
                               use_cache=False).last_hidden_state                    # (B, T, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                with_ref: bool = False, with_values: bool = False, with_entropy: bool = False,
                return_trunk: bool = False, trunk: torch.Tensor | None = None) -> dict:
        """As SharedTrunkPolicy.forward: (B, R) float32 `logprobs` over the response tokens, and if
        asked `ref_logprobs` (adapters off, no grad), `values`, `entropy`. There is no trunk: asking
        for one (cache_trunk) is an error."""
        if return_trunk or trunk is not None:
            raise ValueError("a LoRA policy has no frozen trunk to cache: set cache_trunk false")
        response = input_ids[:, response_start:]                                   # (B, R)
        h = self._hidden(input_ids, attention_mask)[:, response_start - 1:-1]      # (B, R, H)
        out = response_outputs(self.model.lm_head, self.value_head, h, response, with_entropy, with_values)
        if with_ref:
            with torch.no_grad(), self.peft.disable_adapter():
                ref_h = self._hidden(input_ids, attention_mask)[:, response_start - 1:-1]
                out["ref_logprobs"] = logprobs_from_logits(self.model.lm_head(ref_h), response)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merged(self) -> nn.Module:
        """A copy of the causal LM with the adapters merged into its weights (a plain model to save)."""
        return copy.deepcopy(self.peft).merge_and_unload()
