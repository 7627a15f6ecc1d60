"""Batched scoring of a resident model on prompt/answer items, without lm-eval's per-call overhead.

Two request kinds cover the zoo's tasks and most of what merge searches score: greedy generation
until a stop string, and the log-likelihood of a continuation (multiple choice is one such request
per choice). Both follow lm-eval's HF wrapper exactly (tokenization, stop strings, trailing-space
handling), so a task scored here gives the same per-item results as through lm-eval, and per-item
results are returned (not only the mean) because estimators need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ItemResult:
    correct: bool
    output: str


@dataclass(frozen=True)
class Generation:
    """A greedy continuation.

    ``text`` is cut at the first stop string; ``tokens`` counts the tokens generated before the
    one that ended the answer; ``logprob`` sums the greedy tokens' log-probabilities through that
    ending token, so ``exp(logprob)`` is the model's probability of giving exactly this answer
    and stopping: the confidence calibration is measured on. ``margin`` is how far greedy
    decoding was from a reference answer's tokens (see :func:`generate`); NaN without one.
    """

    text: str
    tokens: int
    logprob: float
    margin: float = math.nan


def encode_context(tokenizer, text: str) -> list[int]:
    """A prompt's token ids as lm-eval's HF model encodes a context (``HFLM.tok_encode`` and
    ``tok_batch_encode`` with ``add_bos_token`` unset): with the tokenizer's own special tokens,
    so Gemma and Llama get their ``<bos>`` as they were trained with it (SmolLM2 adds none),
    and without them where the text already starts with the BOS string. Every path that scores
    or trains on a prompt encodes it here, so native scores are lm-eval's on every family."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def pad_id(tokenizer) -> int:
    """Padding id: many causal LMs define none, and EOS is then the safe filler (masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """The ids ``model.generate`` stops on: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return frozenset(i for i in ids if i is not None)


def left_padded(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned in one batch, with their attention mask: every row's last token
    sits in the last column, where the next-token logits are read."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, width - len(seq):] = torch.tensor(list(seq))
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    until: Sequence[str] = ("\n",),
    max_new_tokens: int = 12,
    batch_size: int = 64,
    references: Sequence[Sequence[int] | None] | None = None,
) -> list[Generation]:
    """Greedy-decode each prompt until a stop string (or EOS) appears, as lm-eval's HF wrapper does.

    Left padding lets a whole batch decode in lockstep with the KV cache; a batch stops early once
    every row has stopped, which on short answers halves the cost. A row stops when its decoded
    continuation contains a stop string, so multi-token stops work and a stop inside a merged
    token (``"5\\n"``) cuts the text where lm-eval cuts it.

    With ``references`` (token ids of each prompt's reference answer), each generation also gets
    its ``margin`` in log-probability: while greedy decoding follows the reference, the smallest
    lead of the reference token over the best other token; at the first step it leaves the
    reference, the (negative) lead of the greedy token over the reference one. It comes free
    with the logits decoding computes anyway, is kept with each item, and is what
    :func:`reference_margins` computes without decoding: the check that teacher forcing judges
    items as decoding does.
    """
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    stops = [s for s in (*until, tokenizer.decode([tokenizer.eos_token_id])) if s]
    pad = pad_id(tokenizer)
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded([encode_context(tokenizer, p) for p in prompts[start:start + batch_size]],
                                pad, device)
        rows = len(ids)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits are needed: the LM head over every prompt token cost a
        # fifth of an evaluation.
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1)
        next_pos = position_ids[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprob = [0.0] * rows
        ended: list[int | None] = [None] * rows  # index of the token that ended each row's answer
        wanted = list(references[start:start + batch_size]) if references is not None else [None] * rows
        margin = [math.inf if ref else math.nan for ref in wanted]
        for step in range(max_new_tokens):
            logp = out.logits[:, -1].float().log_softmax(-1)
            top = logp.topk(2, dim=-1)
            for row in range(rows):
                if ended[row] is not None:
                    continue
                token = int(top.indices[row, 0])
                tokens[row].append(token)
                logprob[row] += float(top.values[row, 0])
                reference = wanted[row]
                if reference and step < len(reference):
                    lead = (float(top.values[row, 0] - top.values[row, 1]) if token == reference[step]
                            else float(logp[row, reference[step]] - top.values[row, 0]))
                    margin[row] = min(margin[row], lead)
                    if lead < 0:
                        wanted[row] = None  # left the reference: later steps say nothing about it
                if token in eos or any(s in tokenizer.decode(tokens[row]) for s in stops):
                    ended[row] = step
            if all(e is not None for e in ended) or step == max_new_tokens - 1:
                break
            feed = torch.tensor([tokens[r][-1] if ended[r] is None else pad for r in range(rows)],
                                device=device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos,
                        past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
        for row in range(rows):
            text = tokenizer.decode(tokens[row], skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop)[0]
            count = len(tokens[row]) if ended[row] is None else ended[row]
            results.append(Generation(text, count, logprob[row], margin[row]))
    return results


@torch.no_grad()
def reference_margins(
    model,
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[float]:
    """The ``margin`` :func:`generate` records against each reference, from one forward pass over
    prompt + reference instead of a decoding loop (teacher forcing): greedy decoding reproduces
    the reference's first ``max_new_tokens`` tokens exactly when it is positive.

    Rows are left-padded so every reference ends in the last column and the LM head runs on the
    reference positions only; the leads are logit differences (log-softmax cancels in them)."""
    device = next(model.parameters()).device
    margins: list[float] = []
    for start in range(0, len(prompts), batch_size):
        wanted = [list(r)[:max_new_tokens] for r in references[start:start + batch_size]]
        if not all(wanted):
            raise ValueError("reference_margins needs a non-empty reference per prompt")
        rows = [encode_context(tokenizer, p) + r
                for p, r in zip(prompts[start:start + batch_size], wanted)]
        keep = max(map(len, wanted)) + 1
        ids, mask = left_padded(rows, pad_id(tokenizer), device)
        target, scored = left_padded(wanted, 0, device)  # the references, aligned with the last logits
        scored = scored.bool()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                       logits_to_keep=keep).logits[:, :-1].float()  # position t predicts t + 1
        top = logits.topk(2, dim=-1)
        chosen = logits.gather(-1, target[..., None])[..., 0]
        follows = top.indices[..., 0] == target
        lead = torch.where(follows, chosen - top.values[..., 1], chosen - top.values[..., 0])
        lead = torch.where(scored, lead, math.inf)
        # Up to the first step that leaves the reference (later steps would follow another prefix).
        left = (lead < 0).cumsum(-1)
        counted = (left == 0) | ((left == 1) & (lead < 0))
        margins += torch.where(counted, lead, math.inf).amin(-1).tolist()
    return margins


def generate_exact_match(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[ItemResult]:
    """Greedy answers up to the end of the line, judged by exact match of the stripped text."""
    generations = generate(model, tokenizer, prompts, until=("\n",), max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    return [ItemResult(correct=g.text.strip() == answer, output=g.text.strip())
            for g, answer in zip(generations, answers)]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation, the pair is encoded whole and
    the context's tokens cut off, so a BPE merge across the boundary scores as lm-eval scores it.
    An empty context is replaced by the BOS (or EOS) token, as lm-eval does."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False).input_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_context(tokenizer, context + continuation)
    head = encode_context(tokenizer, context)
    return whole[:len(head)], whole[len(head):]


@torch.no_grad()
def loglikelihoods(
    model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 32
) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)``: the continuation's summed log-probability and whether
    greedy decoding would have produced it, lm-eval's ``loglikelihood`` request."""
    device = next(model.parameters()).device
    pairs = [_encode_pair(tokenizer, c, x) for c, x in requests]
    results: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), batch_size):
        batch = [c + x for c, x in pairs[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, (context, continuation) in enumerate(pairs[start:start + batch_size]):
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=device)
            logp = logits[row, positions].float().log_softmax(-1)
            target = torch.tensor(continuation, device=device)
            results.append((float(logp.gather(-1, target[:, None]).sum()),
                            bool((logp.argmax(-1) == target).all())))
    return results


def choice_loglikelihoods(model, tokenizer, prompt: str, choices: Sequence[str]) -> list[float]:
    """Summed log-probability of each ``" " + choice`` continuation, the way lm-eval scores MC."""
    return [ll for ll, _ in loglikelihoods(model, tokenizer, [(prompt, " " + c) for c in choices])]


@torch.no_grad()
def perplexity(model, windows: Sequence[Sequence[int]], *, pad: int, batch_size: int = 8) -> float:
    """Token perplexity over independent windows of token ids (each window's first token is not
    predicted): a fixed, batchable cost, comparable across candidates, which is all an objective needs."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = max(map(len, batch))
        inputs = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            inputs[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        inputs, mask = inputs.to(device), mask.to(device)
        # log-softmax before dropping the last position: of the sliced (non-contiguous) logits it
        # would first copy them, a third logits-sized tensor (2 GiB more on Gemma's vocabulary)
        logp = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)[:, :-1]
        picked = logp.gather(-1, inputs[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total -= float(picked[keep].sum())
        count += int(keep.sum())
    return math.exp(total / count)
