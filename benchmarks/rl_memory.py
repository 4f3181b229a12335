"""Memory of the RL models: policy + reference + value head with the last N layers trainable and
the reference sharing the frozen trunk (`rollout.SharedTrunkPolicy`), against the naive layout of
a policy plus a separate full reference copy.

Weights are counted on PyTorch's meta device, so the 7B-shaped model (Mistral-7B / Openchat-3.5:
32 layers, hidden 4096, GQA 32/8, 14336 MLP, 32000 vocab) costs no memory to measure. Target: at
most 1.25x the weights of one model. On a GPU, `--cuda` also builds the models for real (small
enough to fit) and reports torch.cuda.max_memory_allocated. A second table counts what each of
8 DDP processes holds for the Starling recipe (top 4 layers) and its LoRA variant (issue 16).

    python -m benchmarks.rl_memory
"""

from __future__ import annotations

import copy

import torch
from transformers import MistralConfig, MistralForCausalLM

from benchmarks.common import report
from starling_lib.rollout import SharedTrunkPolicy

SHAPES = {
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000),
    "tiny-8-layer": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=688, vocab_size=4096),
}


def param_bytes(module: torch.nn.Module, dtype_bytes: int = 2) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype_bytes


# Llama-2-7B (Starling-RM-7B-alpha's body): multi-head attention, an 11008-wide MLP.
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def per_rank(recipe: str, ranks: int = 8) -> dict:
    """GB each DDP process holds for a Starling recipe, before activations and the KV cache (which
    depend on batch and length): nothing is sharded under DDP, so every one of the `ranks` holds
    the same, and the node `ranks` times it. Built on the meta device as policy.online builds it:
    the policy in bf16 with its trained layers (or LoRA adapters) in float32, the reference
    layers in bf16, AdamW's two float32 moments and a float32 gradient per trained parameter,
    DDP's gradient buckets (another copy of the gradients), the bf16 reward model."""
    from starling_lib.lora_policy import LoraPolicy

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**SHAPES["mistral-7b"], tie_word_embeddings=False)).to(torch.bfloat16)
        if recipe == "lora-all-layers":
            policy = LoraPolicy(model, r=16, alpha=32, layers=-1)
        else:
            policy = SharedTrunkPolicy(model, num_trainable_layers=4)
            for layer in policy.model.model.layers[policy.split:]:
                layer.float()
        reward_body = MistralForCausalLM(MistralConfig(**LLAMA2_7B, tie_word_embeddings=False)).model.to(torch.bfloat16)
    trained = [p for p in policy.parameters() if p.requires_grad]
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    gb = {"policy frozen (bf16)": _bytes(frozen) / 1e9, "policy trained (fp32)": _bytes(trained) / 1e9,
          "gradients (fp32)": _bytes(trained) / 1e9, "DDP buckets (fp32)": _bytes(trained) / 1e9 if ranks > 1 else 0.0,
          "AdamW moments (fp32)": 2 * _bytes(trained) / 1e9,
          "reward model (bf16)": (_bytes(reward_body.parameters()) + 4096 * 2) / 1e9}   # body + its linear head
    per = sum(gb.values())
    return {"recipe": recipe, "ranks": ranks, "trained params (M)": sum(p.numel() for p in trained) / 1e6,
            **gb, "per rank GB": per, "node GB": per * ranks}


def main() -> None:
    rows = []
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False))
        one = param_bytes(model)
        for n in (4, 2):
            if n >= shape["num_hidden_layers"]:
                continue
            shared = param_bytes(SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=n))
            naive = 2 * one + shape["hidden_size"] * 2 + 2  # policy + full reference + value head
            rows.append({"model": name, "trainable layers": n, "one model GB (bf16)": one / 1e9,
                         "shared trunk GB": shared / 1e9, "separate reference GB": naive / 1e9,
                         "shared / one model": shared / one, "separate / one model": naive / one})
    report("rl_memory", rows, "weights only (bf16); optimiser state for the trainable layers comes on top "
                              "in both layouts alike. Target: shared / one model <= 1.25.")
    report("rl_memory_per_rank", [per_rank("apa-top-4-layers"), per_rank("lora-all-layers")],
           "Per DDP process for 8 processes (configs/policy/starling_apa_7b.yaml, _lora.yaml): weights, "
           "gradients, DDP's buckets and AdamW state; activations and the KV cache come on top (they depend on "
           "the batch: 64 rollouts of up to 2048 tokens). Every process holds the same under DDP.")


if __name__ == "__main__":
    main()
