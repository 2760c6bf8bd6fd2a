"""Tiny model checkpoints on disk (HF layout, safetensors, byte-level tokenizer; or a real GGUF file) for loader,
cache and plugin tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ("<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus BOS and EOS (vocab 258)."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama(*, seed: int = 0, layers: int = 2) -> PreTrainedModel:
    """A random tiny Llama sized for the byte tokenizer (hidden 32, 4 heads, 2 kv heads)."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_llama(directory: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Write a random tiny Llama with the byte tokenizer to ``directory``; returns it."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(seed=seed, layers=layers)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# HF Llama parameter names (inside model.layers.{i}) -> GGUF tensor names (inside blk.{i}), as llama.cpp writes them.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved per head); transformers undoes it on load."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def save_tiny_gguf(path: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Write the tiny Llama of :func:`save_tiny_llama` as a real GGUF file (Q8_0 matrices, F32 norms, the byte
    tokenizer as a ``gpt2`` vocabulary), the way llama.cpp's converter lays it out; returns ``path`` (~45 KB).

    transformers dequantizes it like any GGUF download, so loader tests exercise the real conversion path.
    """
    import gguf

    model = tiny_llama(seed=seed, layers=layers)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*bytes_to_unicode().values(), *SPECIALS])
    writer.add_token_types([1] * 256 + [3] * len(SPECIALS))  # 1 normal, 3 control
    writer.add_token_scores([0.0] * (256 + len(SPECIALS)))  # no merges: transformers derives none from a byte vocab
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(257)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if name in _GGUF_TOP_NAMES:
            gguf_name = _GGUF_TOP_NAMES[name]
        else:
            _, _, index, *inner, _ = name.split(".")
            role = ".".join(inner)
            gguf_name = f"blk.{index}.{_GGUF_LAYER_NAMES[role]}.weight"
            if role == "self_attn.q_proj":
                weight = _llama_cpp_permute(weight, config.num_attention_heads)
            elif role == "self_attn.k_proj":
                weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        if weight.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
