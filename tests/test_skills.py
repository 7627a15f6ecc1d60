import random

import pytest

from evomerge import zoo_config as config
from evomerge.zoo.skills import SKILLS, make_splits

SIZES = {"train": 300, "validation": 50, "test": 50}


def test_every_skill_the_config_names_has_a_generator_and_no_other():
    assert sorted(SKILLS) == sorted(config.SKILLS)
    assert [n for n in SKILLS if SKILLS[n].trained] == list(config.TRAINED_SKILLS)


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_splits_are_disjoint_and_deterministic(name):
    skill = SKILLS[name]
    first = make_splits(skill, SIZES, seed=7)
    again = make_splits(skill, SIZES, seed=7)
    other = make_splits(skill, SIZES, seed=8)
    assert first == again
    assert first["test"] != other["test"]
    prompts = [set(i["prompt"] for i in first[s]) for s in SIZES]
    assert [len(p) for p in prompts] == list(SIZES.values())
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_evaluation_splits_do_not_depend_on_train_size():
    small = make_splits(SKILLS["add"], {"train": 10, "validation": 20, "test": 20}, seed=0)
    large = make_splits(SKILLS["add"], {"train": 500, "validation": 20, "test": 20}, seed=0)
    assert small["validation"] == large["validation"] and small["test"] == large["test"]


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_multiple_choice_form_has_the_answer_once(name):
    rng = random.Random(0)
    for _ in range(300):
        item = SKILLS[name].item(rng)
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert item["choices"][item["label"]] == item["answer"]


def _operand(prompt: str, prefix: str) -> str:
    return prompt.removeprefix(prefix).removesuffix(" =")


def test_answers_are_right():
    rng = random.Random(1)
    for _ in range(100):
        prompt, answer = SKILLS["add"].make(rng)
        assert int(answer) == sum(map(int, _operand(prompt, "add: ").split("+")))
        prompt, answer = SKILLS["shout"].make(rng)
        assert answer.split() == [c.upper() for c in _operand(prompt, "reverse upper: ").split()[::-1]]
        prompt, answer = SKILLS["reverse"].make(rng)
        assert answer.split() == _operand(prompt, "reverse: ").split()[::-1]
        prompt, answer = SKILLS["sort"].make(rng)
        assert answer == "".join(sorted(_operand(prompt, "sort: ")))
        prompt, answer = SKILLS["upper"].make(rng)
        assert answer == _operand(prompt, "upper: ").upper() and answer != answer.lower()


def test_formats_keep_skills_apart():
    """Each skill's input alphabet differs from the others' (the zoo's merges depend on it)."""
    rng = random.Random(2)
    for _ in range(100):
        assert " " not in _operand(SKILLS["sort"].make(rng)[0], "sort: ")
        assert _operand(SKILLS["reverse"].make(rng)[0], "reverse: ").replace(" ", "").isalpha()
        words = _operand(SKILLS["upper"].make(rng)[0], "upper: ").split()
        assert 1 <= len(words) <= 2 and all(w.isalpha() and w.islower() and len(w) > 2 for w in words)
