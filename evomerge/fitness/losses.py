"""Differentiable signals a gradient step on a merge can follow, one scalar per batch.

The estimators score exact-match answers, which have no gradient. Their smooth stand-ins:
``reference_loss`` is the teacher-forced cross-entropy of each item's reference answer (the
tokens teacher-forced scoring judges, so lowering it raises the margins that scoring reads);
``answer_entropy`` needs no reference at all: the entropy of the model's next-token
distributions along its own greedy answer (AdaMerging's signal, for tasks without labels).
Both tokenize as :mod:`evomerge.fitness.native` does and keep only the logits they read.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.fitness.native import encode_context, left_padded, pad_id


def _answer_logits(model, prompt_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                   pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits predicting each answer token (``[B, A, V]``, float32), the answer ids right-aligned
    (``[B, A]``) and which of them are real (``[B, A]``): rows left-padded so every answer ends
    in the last column and the head runs on the answer positions only."""
    device = next(model.parameters()).device
    ids, mask = left_padded([list(p) + list(a) for p, a in zip(prompt_ids, answers)], pad, device)
    target, real = left_padded(answers, 0, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = target.shape[1] + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits[:, :-1].float()  # position t predicts t + 1
    return logits, target, real.bool()


def reference_loss(model, tokenizer, pairs: Sequence[tuple[str, Sequence[int]]]) -> Tensor:
    """Mean over items of the mean cross-entropy of the reference tokens given the prompt."""
    prompts = [encode_context(tokenizer, p) for p, _ in pairs]
    logits, target, real = _answer_logits(model, prompts, [r for _, r in pairs], pad_id(tokenizer))
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    per_item = (nll * real).sum(-1) / real.sum(-1)
    return per_item.mean()


def answer_entropy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int) -> Tensor:
    """Mean over items of the mean entropy of the next-token distribution along the model's own
    greedy answer (decoded first, without gradient, up to ``max_new_tokens``)."""
    pad = pad_id(tokenizer)
    encoded = [encode_context(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    with torch.no_grad():
        ids, mask = left_padded(encoded, pad, device)
        made = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=pad, num_beams=1)
    answers = []
    eos = tokenizer.eos_token_id
    for row in made[:, ids.shape[1]:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        answers.append(row[:max(cut, 1)])
    logits, _, real = _answer_logits(model, encoded, answers, pad)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ((entropy * real).sum(-1) / real.sum(-1)).mean()
