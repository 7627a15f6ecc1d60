"""Fitness: native scoring agrees with lm-eval, estimators estimate, objectives measure what
they say, and bad input fails in one line. Plumbing on the pico zoo; quality on the real zoo."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from evomerge.config import FitnessConfig, compose, parse, read_config
from evomerge.errors import UserError
from evomerge.fitness.evaluator import Evaluation, Evaluator
from evomerge.fitness.estimators import fit_ability, fit_irt, make_estimator
from evomerge.fitness.evaluator import expected_calibration_error
from evomerge.fitness.native import generate, perplexity
from evomerge.fitness.tasks import TaskSuite
from evomerge.zoo.card import task_arithmetic
from evomerge.zoo.tasks import task_name, write_task_files


@pytest.fixture(scope="module")
def pico(pico_zoo):
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    merger = Merger(ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()}))
    return pico_zoo, merger


def _model(merger, coefficients):
    return merger.materialize(task_arithmetic(merger.experts, merger.num_layers, coefficients))


def _tasks(zoo) -> list[str]:
    skills = zoo.config.skills
    return [task_name(s) for s in skills] + [task_name(s, multiple_choice=True) for s in skills]


# --- native scoring against lm-eval -----------------------------------------------------------


@pytest.fixture(scope="module")
def echo_tasks(pico, tmp_path_factory):
    """A task whose answers are a pico expert's own greedy outputs on even items and wrong on odd
    ones: exact match is then 1,0,1,0,... only if both paths generate the same text. The expert
    with the most varied outputs (on its own, mastered multiple-choice skill) is used, so
    matching one string is not enough."""
    zoo, merger = pico
    runs = []
    for skill in zoo.config.skills:
        model = _model(merger, {skill: 1.0})
        items = zoo.items(skill, "validation")
        outputs = [g.text.strip() for g in generate(model, merger.tokenizer, [r["prompt"] for r in items])]
        runs.append((len(set(outputs)), skill, items, outputs))
    variety, skill, items, outputs = max(runs)
    assert variety >= 3, "pico experts should not answer everything alike"
    # Odd items also move the multiple-choice label off the true answer, so both kinds mix.
    echoed = [{**row, "answer": out, "label": row["label"]} if i % 2 == 0 else
              {**row, "answer": out + "#", "label": (row["label"] + 1) % len(row["choices"])}
              for i, (row, out) in enumerate(zip(items, outputs))]
    task_dir = tmp_path_factory.mktemp("echo-tasks")
    write_task_files("echo", {"validation": echoed, "test": echoed}, task_dir)
    return task_dir, _model(merger, {skill: 1.0}), len(items)


def test_native_gives_lm_eval_s_per_item_results(pico, echo_tasks):
    zoo, merger = pico
    task_dir, model, n = echo_tasks
    names = ["zoo_echo", "zoo_echo_mc"]
    selection = {name: list(range(n)) for name in names}
    fast = TaskSuite(names, merger.tokenizer, include_path=str(task_dir)).run(model, "validation", selection)
    slow = TaskSuite(names, merger.tokenizer, include_path=str(task_dir), native=False).run(
        model, "validation", selection)
    assert fast["zoo_echo"].correct == [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    assert slow["zoo_echo"].correct == fast["zoo_echo"].correct
    assert slow["zoo_echo"].length == fast["zoo_echo"].length
    assert slow["zoo_echo_mc"].correct == fast["zoo_echo_mc"].correct
    assert 0 < sum(fast["zoo_echo_mc"].correct) < n  # a mix of right and wrong choices
    # Only the native path has probabilities: a real number in (0, 1] per item.
    assert all(0 < c <= 1 for c in fast["zoo_echo"].confidence + fast["zoo_echo_mc"].confidence)
    assert all(math.isnan(c) for c in slow["zoo_echo"].confidence)


def _teacher_forced_margin(model, tokenizer, prompt: str, answer: str) -> float:
    """The margin by its definition, from one forward pass over prompt + reference answer: the
    smallest lead of a reference token over the best other one while the argmax follows the
    reference, and the argmax's lead over the reference token where it first leaves it."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    reference = tokenizer(" " + answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + reference])).logits[0]
    margin = math.inf
    for t, token in enumerate(reference[:12]):
        logp = logits[len(prompt_ids) - 1 + t].float().log_softmax(-1)
        best = int(logp.argmax())
        if best != token:
            return min(margin, float(logp[token] - logp[best]))
        others = logp.clone()
        others[token] = -math.inf
        margin = min(margin, float(logp[token] - others.max()))
    return margin


def test_native_records_each_item_s_margin(pico, echo_tasks):
    zoo, merger = pico
    task_dir, model, n = echo_tasks
    names = ["zoo_echo", "zoo_echo_mc"]
    suite = TaskSuite(names, merger.tokenizer, include_path=str(task_dir))
    results = suite.run(model, "validation", {name: list(range(n)) for name in names})
    docs = suite.tasks("validation")["zoo_echo"].docs
    margins = results["zoo_echo"].margin
    expected = [_teacher_forced_margin(model, merger.tokenizer, d["prompt"], d["answer"]) for d in docs]
    assert margins == pytest.approx(expected, abs=1e-3)
    assert min(margins) < 0 < max(margins)
    # Teacher forcing finds the same margins in one forward pass, and judges the items as
    # decoding did (the echo answers are the expert's own spellings).
    forced = suite.run(model, "validation", {"zoo_echo": list(range(n))}, teacher_forcing=True)["zoo_echo"]
    assert forced.margin == pytest.approx(margins, abs=1e-3)
    assert forced.correct == results["zoo_echo"].correct
    # Multiple choice: the reference choice's log-likelihood lead; positive exactly when right.
    choice = results["zoo_echo_mc"]
    assert all((m > 0) == (c == 1.0) for m, c in zip(choice.margin, choice.correct))
    assert not any(math.isnan(m) for m in choice.margin)
    # lm-eval's path exposes no margins.
    slow = TaskSuite(names, merger.tokenizer, include_path=str(task_dir), native=False).run(
        model, "validation", {"zoo_echo": [0, 1]})
    assert all(math.isnan(m) for m in slow["zoo_echo"].margin)


def test_native_scores_a_subset_by_document_id(pico, echo_tasks):
    zoo, merger = pico
    task_dir, model, n = echo_tasks
    ids = [5, 2, n - 1]
    suite = TaskSuite(["zoo_echo"], merger.tokenizer, include_path=str(task_dir), native=False)
    slow = suite.run(model, "validation", {"zoo_echo": ids})["zoo_echo"]
    fast = TaskSuite(["zoo_echo"], merger.tokenizer, include_path=str(task_dir)).run(
        model, "validation", {"zoo_echo": ids})["zoo_echo"]
    assert fast.ids == slow.ids == sorted(ids)
    assert fast.correct == slow.correct == [float(i % 2 == 0) for i in sorted(ids)]


# --- estimators on synthetic response matrices ------------------------------------------------


def _irt_responses(thetas, a, d, seed):
    p = 1 / (1 + np.exp(-(np.outer(thetas, a) + d)))
    return (np.random.default_rng(seed).random(p.shape) < p).astype(float)


def test_random_subset_is_fixed_per_seed_and_task():
    one, again, other = (make_estimator("random", 10, seed) for seed in (0, 0, 1))
    ids = one.select("t", 100)
    assert ids == again.select("t", 100) == one.select("t", 100)
    assert len(set(ids)) == 10 and ids == sorted(ids)
    assert ids != other.select("t", 100) and ids != one.select("u", 100)
    assert one.select("t", 7) == list(range(7))  # budget above the split: every item
    assert one.estimate("t", ids, [1.0] * 5 + [0.0] * 5) == 0.5


def test_anchors_weigh_clusters_by_their_share():
    # 70 items probes 0-4 solve, 30 none solves: a candidate that solves exactly the first kind
    # scores 0.70, and the anchors must say so whichever items they pick.
    y = np.zeros((8, 100))
    y[:5, :70] = 1.0
    estimator = make_estimator("anchors", 10, 0)
    state = estimator.fit({"t": y})
    ids = estimator.select("t", 100)
    weights = state["tasks"]["t"]["weights"]
    assert len(ids) == 10 and sum(weights) == pytest.approx(1.0)
    assert sum(w for i, w in zip(ids, weights) if i < 70) == pytest.approx(0.7)
    candidate = (np.arange(100) < 70).astype(float)
    assert estimator.estimate("t", ids, candidate[ids]) == pytest.approx(0.7)


def test_irt_recovers_ability_order_and_predicts_unseen_items():
    rng = np.random.default_rng(0)
    a, d = np.exp(rng.normal(0, 0.3, 120)), rng.normal(0, 1.5, 120)
    probe_theta = np.linspace(-2, 2, 30)
    fitted_a, fitted_d, fitted_theta = fit_irt(_irt_responses(probe_theta, a, d, 1))
    assert np.corrcoef(fitted_theta, probe_theta)[0, 1] > 0.95
    assert np.corrcoef(fitted_d, d)[0, 1] > 0.8
    new_theta = np.array([-1.5, -0.5, 0.5, 1.5])
    answers = _irt_responses(new_theta, a, d, 2)
    abilities = [fit_ability(fitted_a, fitted_d, row) for row in answers]
    assert abilities == sorted(abilities)
    # On data a 2PL model describes, 20 items per candidate: gp-IRT estimates beat the anchor
    # estimate, which beats a random subset of the same size (mean absolute error, 200 candidates).
    probes, candidates = _irt_responses(probe_theta, a, d, 1), _irt_responses(np.linspace(-2, 2, 200), a, d, 4)
    error = {}
    for name in ("random", "anchors", "irt"):
        runs = []
        for seed in range(3):
            estimator = make_estimator(name, 20, seed)
            estimator.fit({"t": probes})
            ids = estimator.select("t", 120)
            runs += [abs(estimator.estimate("t", ids, row[ids]) - row.mean()) for row in candidates]
        error[name] = float(np.mean(runs))
    assert error["irt"] < error["anchors"] < error["random"]
    assert error["irt"] < 0.85 * error["random"], error


def test_estimator_state_round_trips_through_json():
    y = _irt_responses(np.linspace(-2, 2, 10), np.ones(60), np.linspace(-2, 2, 60), 3)
    fitted = make_estimator("irt", 12, 0)
    state = json.loads(json.dumps(fitted.fit({"t": y})))
    restored = make_estimator("irt", 12, 0)
    restored.load_state(state)
    ids = fitted.select("t", 60)
    assert restored.select("t", 60) == ids
    assert restored.estimate("t", ids, y[4, ids]) == fitted.estimate("t", ids, y[4, ids])
    with pytest.raises(UserError, match="'anchors' with 12"):
        make_estimator("anchors", 12, 0).load_state(state)
    with pytest.raises(RuntimeError, match="load_state"):
        make_estimator("anchors", 12, 0).select("t", 60)


# --- objectives ---------------------------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    # bin 9: conf 0.95, acc 0.5 -> 0.45 x 2 items; bin 1: conf 0.15, acc 0 -> 0.15 x 2;
    # bin 5: conf 0.55, acc 1 -> 0.45 x 1; the NaN item is left out: (0.9 + 0.3 + 0.45) / 5.
    ece = expected_calibration_error([0.95, 0.95, 0.15, 0.15, 0.55, math.nan], [1, 0, 0, 0, 1, 1])
    assert ece == pytest.approx(0.33)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0


def test_evaluator_scores_every_objective(pico):
    zoo, merger = pico
    config = FitnessConfig(estimator="random", items_per_task=5,
                           objectives=("tasks", "mean", "ece", "length", "perplexity"), perplexity_tokens=256,
                           teacher_forcing=False)
    evaluator = Evaluator(config, _tasks(zoo), merger.tokenizer, include_path=str(zoo.task_dir))
    names = [o.name for o in evaluator.objectives]
    assert names == _tasks(zoo) + ["mean", "ece", "length", "perplexity"]
    model = _model(merger, {zoo.config.skills[1]: 1.0})
    full = evaluator.score(model, full=True)
    assert list(full.objectives) == names
    for name in _tasks(zoo):
        assert full.items[name]["ids"] == list(range(zoo.config.eval_size))
        assert full.scores[name] == pytest.approx(np.mean(full.items[name]["correct"]))
    assert full.objectives["mean"] == pytest.approx(np.mean(list(full.scores.values())))
    generated = [n for t in _tasks(zoo) if not t.endswith("_mc") for n in full.items[t]["length"]]
    assert full.objectives["length"] == pytest.approx(np.mean(generated)) and full.objectives["length"] > 0
    # Perplexity is exp of the mean next-token loss, as the model's own loss computes it.
    with torch.no_grad():
        window = torch.tensor([evaluator._windows[0]])
        loss = model(input_ids=window, labels=window).loss
    assert perplexity(model, evaluator._windows[:1], pad=0) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert full.objectives["perplexity"] > 1
    cheap = evaluator.score(model)
    for name in _tasks(zoo):
        assert len(cheap.items[name]["ids"]) == 5
        assert cheap.scores[name] == pytest.approx(np.mean(cheap.items[name]["correct"]))
        subset = [full.items[name]["correct"][i] for i in cheap.items[name]["ids"]]
        assert cheap.items[name]["correct"] == subset  # an item scores the same in any batch
    assert Evaluation.from_dict(json.loads(json.dumps(cheap.to_dict()))).scores == cheap.scores


def test_teacher_forcing_judges_estimator_items_without_decoding(pico):
    zoo, merger = pico
    config = FitnessConfig(estimator="random", items_per_task=6, teacher_forcing=True)
    evaluator = Evaluator(config, _tasks(zoo), merger.tokenizer, include_path=str(zoo.task_dir))
    model = _model(merger, {zoo.config.skills[0]: 1.0})
    cheap, full = evaluator.score(model), evaluator.score(model, full=True)
    for name in _tasks(zoo):
        got, every = cheap.items[name], full.items[name]
        assert len(got["ids"]) == 6
        if name.endswith("_mc"):  # multiple choice is scored as before
            assert got["correct"] == [every["correct"][i] for i in got["ids"]]
            continue
        assert all(math.isnan(c) for c in got["confidence"])  # no decoded answer behind these
        assert not any(math.isnan(c) for c in every["confidence"])  # full evaluations decode
        assert got["correct"] == [float(m > 0) for m in got["margin"]]
        # The forward pass finds the margins the decoding loop found on the same items.
        assert got["margin"] == pytest.approx([every["margin"][i] for i in got["ids"]], abs=1e-3)


def test_fitted_state_moves_between_evaluators(pico):
    zoo, merger = pico
    tasks = _tasks(zoo)
    config = FitnessConfig(estimator="irt", items_per_task=4)
    lead = Evaluator(config, tasks, merger.tokenizer, include_path=str(zoo.task_dir))
    probes = [lead.score(_model(merger, c), full=True)
              for c in [{}, *({s: 1.0} for s in zoo.config.skills), {s: 0.5 for s in zoo.config.skills}]]
    with pytest.raises(RuntimeError, match="fit"):
        lead.score(_model(merger, {}))
    state = json.loads(json.dumps(lead.fit(probes)))
    worker = Evaluator(config, tasks, merger.tokenizer, include_path=str(zoo.task_dir))
    worker.load_state(state)
    model = _model(merger, {s: 0.3 for s in zoo.config.skills})
    mine, theirs = lead.score(model), worker.score(model)
    assert mine.scores == theirs.scores
    assert all(len(mine.items[t]["ids"]) == 4 for t in tasks)
    assert all(0 <= v <= 1 for v in mine.scores.values())


# --- configuration and bad input ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "random", "anchors", "irt"])
def test_hydra_fitness_configs_compose(name):
    config = read_config(compose([f"fitness={name}"])).fitness
    assert config.estimator == name and config.objectives == ["tasks"]


@pytest.mark.parametrize("settings, message", [
    ({"estimator": "tiny"}, "unknown fitness.estimator 'tiny'; valid: full, random, anchors, irt"),
    ({"items_per_task": 0}, "items_per_task=0 must be an integer >= 1"),
    ({"objectives": ["tasks", "speed"]}, "unknown fitness objective 'speed'; valid: tasks, mean"),
    ({"multi_fidelity": 2}, "multi_fidelity=2 must be in"),
    ({"verify": -1}, "fitness.verify=-1 must be an integer >= 0"),
    ({"budget": 3}, "unknown fitness setting 'budget'; valid: batch_size"),
    ({"teacher_forcing": True, "objectives": ["tasks", "length"]}, "teacher_forcing=true scores answers without"),
])
def test_bad_fitness_settings_fail_in_one_line(settings, message):
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        parse(FitnessConfig, settings)
    assert "\n" not in str(caught.value)


def test_bad_task_input_fails_before_any_scoring(pico, tmp_path):
    zoo, merger = pico
    generating, choosing = task_name(zoo.config.skills[0]), task_name(zoo.config.skills[0], multiple_choice=True)
    with pytest.raises(UserError, match=f"unknown lm-eval task '{generating[:-1]}'; did you mean {generating}"):
        Evaluator(FitnessConfig(), [generating[:-1]], merger.tokenizer, include_path=str(zoo.task_dir))
    with pytest.raises(UserError, match="is not a folder"):
        Evaluator(FitnessConfig(), [generating], merger.tokenizer, include_path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="ece needs per-item confidence"):
        Evaluator(FitnessConfig(objectives=("ece",), native=False, teacher_forcing=False), [generating], merger.tokenizer,
                  include_path=str(zoo.task_dir))
    with pytest.raises(UserError, match="length needs a generate_until task"):
        Evaluator(FitnessConfig(objectives=("length",), teacher_forcing=False), [choosing], merger.tokenizer,
                  include_path=str(zoo.task_dir))
    evaluator = Evaluator(FitnessConfig(estimator="random"), [generating], merger.tokenizer,
                          include_path=str(zoo.task_dir))
    with pytest.raises(ValueError, match="full=True"):
        evaluator.score(_model(merger, {}), split="test")
