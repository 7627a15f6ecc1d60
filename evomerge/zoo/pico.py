"""The pico base: a tiny random Llama with a character-level tokenizer, made in a second.

It exercises every code path the real zoo does (loading, task vectors, fine-tuning, scoring)
at a size where plumbing tests run in milliseconds. Its scores mean nothing; quality tests use
the real zoo.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """Every printable ASCII character is one token, so any skill's text is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_pico_base(out_dir: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
