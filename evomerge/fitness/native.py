"""Batched scoring of a resident model on prompt/answer items, without lm-eval's per-call overhead.

Two kinds cover the zoo's tasks and most of what merge searches score: greedy generation judged by
exact match, and multiple choice judged by the summed log-likelihood of each choice. Per-item
results are returned (not only the mean) because estimators later need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch


@dataclass(frozen=True)
class ItemResult:
    correct: bool
    output: str


def pad_id(tokenizer) -> int:
    """Padding id: many causal LMs define none, and EOS is then the safe filler (masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@lru_cache(maxsize=8)
def _stop_ids(tokenizer) -> frozenset[int]:
    """EOS plus every token whose text holds a newline: answers are one line."""
    stops = {tokenizer.eos_token_id}
    stops.update(tid for tok, tid in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([tok]))
    return frozenset(s for s in stops if s is not None)


@torch.no_grad()
def generate_exact_match(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[ItemResult]:
    """Greedy-decode each prompt until a newline or EOS and compare the stripped text to the answer.

    Left padding lets a whole batch decode in lockstep with the KV cache; a batch stops early once
    every row has hit a stop token, which on short answers halves the cost.
    """
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(_stop_ids(tokenizer)), device=device)
    pad = pad_id(tokenizer)
    results: list[ItemResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start : start + batch_size]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        past = out.past_key_values
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        generated: list[torch.Tensor] = []
        next_pos = position_ids[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            generated.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_pos = next_pos + 1
        tokens = torch.stack(generated, dim=1).tolist()
        stop_set = set(stop.tolist())
        for row, seq in enumerate(tokens):
            cut = next((i for i, t in enumerate(seq) if t in stop_set), len(seq))
            text = tokenizer.decode(seq[:cut], skip_special_tokens=True).strip()
            results.append(ItemResult(correct=text == answers[start + row], output=text))
    return results


@torch.no_grad()
def choice_loglikelihoods(
    model, tokenizer, prompt: str, choices: Sequence[str]
) -> list[float]:
    """Summed log-probability of each ``" " + choice`` continuation, the way lm-eval scores MC."""
    device = next(model.parameters()).device
    context = tokenizer(prompt, add_special_tokens=False).input_ids
    rows = [context + tokenizer(" " + c, add_special_tokens=False).input_ids for c in choices]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
    logprobs = model(input_ids=ids.to(device)).logits.float().log_softmax(-1)
    scores = []
    for r, seq in enumerate(rows):
        targets = torch.tensor(seq[len(context) :], device=device)
        positions = torch.arange(len(context) - 1, len(seq) - 1, device=device)
        scores.append(float(logprobs[r, positions, targets].sum()))
    return scores
