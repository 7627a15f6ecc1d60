"""Full fine-tuning of the base into one expert, the way small real experts are made.

Small learning rate, a few hundred optimizer steps, loss on answer tokens only: the task vector
stays in the small-perturbation regime (‖τ‖/‖θ‖ well under 1%) where merging real fine-tunes works.
Logits are computed only at answer positions: with a 49k vocabulary the LM head dominates a
step's cost on short items, and the prompt positions carry no loss anyway.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from evomerge.zoo_config import FinetuneConfig
from evomerge.fitness.native import encode_context, pad_id
from evomerge.zoo.skills import Item


def encode_items(tokenizer, items: Sequence[Item]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + " answer" + EOS, and where the answer starts.

    The prompt is tokenized alone, exactly as it is at evaluation time, so training and
    generation see the same prompt tokens.
    """
    encoded = []
    for item in items:
        prompt = encode_context(tokenizer, str(item["prompt"]))
        answer = tokenizer(" " + str(item["answer"]), add_special_tokens=False).input_ids
        encoded.append((prompt + answer + [tokenizer.eos_token_id], len(prompt)))
    return encoded


def _batch(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (seq, answer_start) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, answer_start : len(seq)] = torch.tensor(seq[answer_start:])
    return ids, mask, labels


def finetune(
    model,
    tokenizer,
    items: Sequence[Item],
    config: FinetuneConfig,
    seed: int,
    accuracy: Callable[[object], float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train ``model`` in place; returns losses, steps run, the last checked accuracy, wall time.

    With ``config.check_every`` set, ``accuracy(model)`` (on held-out items) is measured every
    that many steps and training stops at the first check reaching ``config.target_accuracy``.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = encode_items(tokenizer, items)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [rows[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        ids, mask, labels = _batch(batch, pad_id(tokenizer))
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Position t predicts token t+1: keep only positions whose next token is an answer token.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == config.steps - 1:
            log(f"  step {step + 1}/{config.steps} loss {loss.item():.4f} "
                f"({(time.perf_counter() - started) / (step + 1):.2f} s/step)")
        if accuracy is not None and config.check_every and (step + 1) % config.check_every == 0:
            model.eval()
            reached = accuracy(model)
            model.train()
            log(f"  step {step + 1}: held-out accuracy {reached:.2f}")
            if reached >= config.target_accuracy:
                break
    model.eval()
    head = min(10, len(losses))
    return {
        "loss_start": sum(losses[:head]) / head,
        "loss_end": sum(losses[-head:]) / head,
        "steps": len(losses),
        "seconds": time.perf_counter() - started,
    }
