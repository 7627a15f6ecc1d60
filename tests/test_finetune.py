import dataclasses

import torch

from evomerge.pool import load_model
from evomerge.zoo_config import FinetuneConfig
from evomerge.zoo.finetune import encode_items, finetune


def test_answer_tokens_follow_the_prompt_tokens_exactly(pico_zoo):
    _, tokenizer = load_model(str(pico_zoo.base))
    item = pico_zoo.items("add", "train")[0]
    (ids, answer_start), = encode_items(tokenizer, [item])
    prompt = tokenizer(item["prompt"], add_special_tokens=False).input_ids
    assert ids[:answer_start] == prompt  # generation sees the same prompt tokens training did
    assert tokenizer.decode(ids[answer_start:-1]).strip() == item["answer"]
    assert ids[-1] == tokenizer.eos_token_id


def test_training_lowers_the_loss_and_is_deterministic(pico_zoo):
    config = FinetuneConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, check_every=0)
    items = pico_zoo.items("sort", "train")
    weights = []
    for _ in range(2):
        model, tokenizer = load_model(str(pico_zoo.base))
        stats = finetune(model, tokenizer, items, config, seed=5, log=lambda _: None)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert stats["steps"] == 12 and stats["loss_end"] < stats["loss_start"]
    assert torch.equal(weights[0], weights[1])


def test_training_stops_at_the_first_check_that_reaches_the_target(pico_zoo):
    config = FinetuneConfig(steps=50, batch_size=4, lr=1e-3, warmup_steps=1, check_every=3,
                            target_accuracy=0.9)
    checks = iter([0.2, 0.5, 0.95, 1.0])
    seen = []

    def accuracy(model):
        assert not model.training  # checks run in eval mode
        seen.append(next(checks))
        return seen[-1]

    model, tokenizer = load_model(str(pico_zoo.base))
    stats = finetune(model, tokenizer, pico_zoo.items("add", "train"), config, seed=0,
                     accuracy=accuracy, log=lambda _: None)
    assert seen == [0.2, 0.5, 0.95] and stats["steps"] == 9
    unchecked = dataclasses.replace(config, check_every=0, steps=5)
    stats = finetune(model, tokenizer, pico_zoo.items("add", "train"), unchecked, seed=0,
                     accuracy=accuracy, log=lambda _: None)
    assert stats["steps"] == 5 and len(seen) == 3
