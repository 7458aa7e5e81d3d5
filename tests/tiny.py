"""Tiny random models of each supported family, with a byte-level tokenizer.

They run in milliseconds and exercise the same code paths as real checkpoints
(GQA, sliding windows, QK-norm, Gemma's scaled embeddings), so most tests use them;
a few integration tests use the real embedded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB = 259
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    eos_token_id=256, pad_token_id=256, bos_token_id=None,
)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=256)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **_COMMON, head_dim=16, sliding_window=256, layer_types=[
                "sliding_attention", "sliding_attention", "full_attention"
            ],
        )
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

# Models whose sliding-window layers keep less than a test's context: (family, window).
# Gemma 3: 5 sliding layers then 1 full; Mistral: every layer sliding; Qwen2 with
# use_sliding_window: full layers below max_window_layers, sliding above; GPT-OSS:
# sliding and full alternating, with attention sinks (eager attention on CPU).
WINDOWED = ("gemma3", "mistral", "qwen2", "gpt_oss")


def windowed_config(family: str, window: int):
    import transformers as tf

    common = {**_COMMON, "sliding_window": window}
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**{**common, "num_hidden_layers": 4}, use_sliding_window=True, max_window_layers=2)
    if family == "gpt_oss":
        return tf.GptOssConfig(**{**common, "num_hidden_layers": 4, "intermediate_size": 64},
                               num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(family)


def windowed_model(family: str, window: int = 16, seed: int = 0):
    """A KVModel around a tiny ``family`` model whose sliding layers keep ``window - 1``."""
    from transformers import AutoModelForCausalLM

    from kvzip.model import KVModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(windowed_config(family, window))
    model.eval()
    return KVModel(model, byte_tokenizer())


def tiny_model(family: str = "llama", seed: int = 0):
    """A KVModel around a freshly initialised tiny model of ``family``."""
    from transformers import AutoModelForCausalLM

    from kvzip.model import KVModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    return KVModel(model, byte_tokenizer())


def save_tiny_model(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a local Hugging Face directory."""
    km = tiny_model(family, seed)
    km.model.save_pretrained(directory)
    km.tokenizer.save_pretrained(directory)
    return directory
