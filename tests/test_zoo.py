"""Quality of the real SmolLM2 zoo: the numbers that make it a testbed for merging."""

import pytest
import torch

from evomerge.fitness.native import generate_exact_match
from evomerge.zoo.card import task_arithmetic

pytestmark = pytest.mark.zoo


def test_experts_master_their_skill_and_the_base_does_not(zoo):
    card = zoo.card()
    for skill in zoo.config.skills:
        assert card["scores"][skill]["test"][skill] >= 0.9, skill
        assert card["scores"][skill]["validation"][skill] >= 0.9, skill
        assert card["scores"]["base"]["test"][skill] <= card["scores"][skill]["test"][skill] - 0.4, skill
    assert card["assessment"]["experts_master_own_skill"] and card["assessment"]["base_far_below"]
    # Real fine-tunes move weights by well under 1%: the regime where merging works.
    assert all(0 < v < 0.01 for v in card["relative_norms"].values())
    assert "| task_arithmetic@0.5 |" in (zoo.root / "README.md").read_text()


def test_uniform_merges_fall_short_of_the_experts(zoo):
    assert zoo.card()["assessment"]["uniform_merges_fall_short"]


def test_uniform_merges_keep_part_of_every_skill(zoo):
    """Some uniform merge keeps at least base + 0.10 of each skill (test split): search starts
    from merges that already hold part of every skill, and has the rest to find."""
    card = zoo.card()
    assert card["assessment"]["uniform_merges_keep_part"]
    merges = [name for name in card["scores"] if name.startswith("task_arithmetic@")]
    for skill in zoo.config.skills:
        kept = max(card["scores"][m]["test"][skill] for m in merges)
        assert kept >= card["scores"]["base"]["test"][skill] + 0.10, skill


def _materialize(merger, coefficients):
    return merger.materialize(task_arithmetic(merger.experts, merger.num_layers, coefficients))


def test_base_is_the_real_instruct_model(zoo_merger):
    tokenizer, model = zoo_merger.tokenizer, _materialize(zoo_merger, {})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings


def test_card_scores_reproduce(zoo, zoo_merger):
    """The card's numbers come from the models on disk, not from a lucky build."""
    rows = zoo.items("reverse", "validation")
    model = _materialize(zoo_merger, {"reverse": 1.0})
    results = generate_exact_match(model, zoo_merger.tokenizer, [r["prompt"] for r in rows],
                                   [r["answer"] for r in rows])
    accuracy = sum(r.correct for r in results) / len(results)
    assert accuracy == pytest.approx(zoo.card()["scores"]["reverse"]["validation"]["reverse"])


def test_lm_eval_loads_the_zoo_tasks_offline_and_agrees_with_the_native_scorer(zoo, zoo_merger):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.fitness.native import choice_loglikelihoods

    limit = 16
    model, tokenizer = _materialize(zoo_merger, {"reverse": 1.0}), zoo_merger.tokenizer
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu")
    tasks = get_task_dict(["zoo_reverse", "zoo_add_mc"], TaskManager(include_path=str(zoo.task_dir)))
    results = evaluate(lm=lm, task_dict=tasks, limit=limit, verbosity="ERROR")["results"]
    rows = zoo.items("reverse", "test")[:limit]
    native = generate_exact_match(model, tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    mc_native = []
    for row in zoo.items("add", "test")[:limit]:
        scores = choice_loglikelihoods(model, tokenizer, row["prompt"], row["choices"])
        mc_native.append(scores.index(max(scores)) == row["label"])
    assert results["zoo_reverse"]["exact_match,strip"] == pytest.approx(sum(r.correct for r in native) / limit)
    assert results["zoo_add_mc"]["acc,none"] == pytest.approx(sum(mc_native) / limit)
    assert 0 < results["zoo_reverse"]["exact_match,strip"]


def test_the_gguf_file_loads_to_exactly_the_saved_base(zoo):
    """The hub-free path: the PyPI wheel's GGUF, dequantized by transformers, is the zoo's base."""
    from evomerge.pool import ModelPool
    from evomerge.zoo.base import SOURCES

    pool = ModelPool(str(zoo.downloads / SOURCES["smollm2"].gguf_name), {"saved": str(zoo.base)})
    assert pool.relative_norms() == {"saved": 0.0}
    assert len(pool.base) == 2 + 9 * 30  # embedding, final norm, 9 per block; the tied head once
