"""Fitness on the real SmolLM2 zoo: the Evaluator reproduces the card, and the native path gives
lm-eval's per-item results on a real BPE tokenizer and real merges."""

import pytest

from evomerge.config import FitnessConfig
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.tasks import TaskSuite
from evomerge.zoo.card import task_arithmetic
from evomerge.zoo.tasks import task_name

pytestmark = pytest.mark.zoo


def _model(merger, coefficients):
    return merger.materialize(task_arithmetic(merger.experts, merger.num_layers, coefficients))


def test_evaluator_reproduces_the_card(zoo, zoo_merger):
    """One expert on its own task (test_zoo reproduces another through the bare scorer): the
    Evaluator's batching and item bookkeeping must not move the card's number."""
    card = zoo.card()["scores"]
    skill = list(zoo.config.skills)[0]
    evaluator = Evaluator(FitnessConfig(estimator="full", batch_size=64), [task_name(skill)],
                          zoo_merger.tokenizer, include_path=str(zoo.task_dir))
    scores = evaluator.score(_model(zoo_merger, {skill: 1.0}), full=True).scores
    assert scores[task_name(skill)] == pytest.approx(card[skill]["validation"][skill])
    assert scores[task_name(skill)] >= 0.9


def test_native_matches_lm_eval_on_a_real_merge(zoo, zoo_merger):
    skills = list(zoo.config.skills)
    names = [task_name(s) for s in skills] + [task_name(skills[0], multiple_choice=True)]
    # A merge that half keeps some skills: answers right, wrong and malformed all occur.
    model = _model(zoo_merger, {s: 0.3 for s in skills})
    selection = {name: list(range(0, 40, 5)) for name in names}
    fast = TaskSuite(names, zoo_merger.tokenizer, include_path=str(zoo.task_dir)).run(model, "validation", selection)
    slow = TaskSuite(names, zoo_merger.tokenizer, include_path=str(zoo.task_dir), native=False).run(
        model, "validation", selection)
    for name in names:
        assert fast[name].correct == slow[name].correct, name
    assert any(any(r.correct) for r in fast.values())


def test_teacher_forcing_judges_real_items_as_decoding_does(zoo, zoo_merger):
    """On a real BPE tokenizer, the reference's tokens are what the experts learned to emit: a
    forward pass over prompt + reference must call right exactly the items decoding gets right,
    on a merge that half keeps each skill (both kinds of answer occur)."""
    names = [task_name(s) for s in zoo.config.skills]
    model = _model(zoo_merger, {s: 0.4 for s in zoo.config.skills})
    suite = TaskSuite(names, zoo_merger.tokenizer, include_path=str(zoo.task_dir), batch_size=64)
    selection = {name: list(range(0, 100, 4)) for name in names}
    decoded = suite.run(model, "validation", selection)
    forced = suite.run(model, "validation", selection, teacher_forcing=True)
    for name in names:
        assert forced[name].correct == decoded[name].correct, name
        assert forced[name].margin == pytest.approx(decoded[name].margin, abs=1e-3), name
    right = sum(sum(r.correct) for r in decoded.values())
    assert 0 < right < sum(len(r.correct) for r in decoded.values())
