"""Tiny random-init causal LMs of every supported architecture, built offline from their config classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

VOCAB = 258  # the byte tokenizer of tests/checkpoints.py: 256 bytes + BOS + EOS
SPECIAL_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 32, 64, 4, 2, 3


def _llama_like(cls_name: str, **extra: object) -> Callable[[], object]:
    def build() -> object:
        cls = getattr(transformers, cls_name)
        return cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                   max_position_embeddings=256, **{**SPECIAL_IDS, **extra})

    return build


CONFIGS: dict[str, Callable[[], object]] = {
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=8),
    "gemma": _llama_like("GemmaConfig", head_dim=8),
    "gemma2": _llama_like("Gemma2Config", head_dim=8, final_logit_softcapping=30.0),
    "gemma3_text": _llama_like("Gemma3TextConfig", head_dim=8, sliding_window=16),
    "olmo": _llama_like("OlmoConfig"),
    "olmo2": _llama_like("Olmo2Config"),
    "phi3": _llama_like("Phi3Config"),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
                                            n_head=HEADS, n_positions=256,
                                            **SPECIAL_IDS),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                   intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                                                   num_attention_heads=HEADS, max_position_embeddings=256,
                                                   **SPECIAL_IDS),
}
ARCHITECTURES = tuple(CONFIGS)


def tiny_model(architecture: str, *, seed: int = 0) -> PreTrainedModel:
    """A random tiny model of ``architecture`` (a key of :data:`CONFIGS`) in eval mode, float32, eager attention."""
    config = CONFIGS[architecture]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def random_ids(n: int = 2, length: int = 7, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=generator)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A bit-exact copy of the model's state dict, to compare against after interventions."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every tensor equals its snapshot bit for bit (int32 views: -0.0 vs 0.0 and NaN payloads count)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key].view(torch.int32), value.view(torch.int32)), f"{key} changed"
