"""Synthetic skills the zoo's experts are fine-tuned on.

Each skill is a deterministic item generator: a prompt, the exact answer, and distractors for a
multiple-choice form. Skills are chosen so the base model fails them by format or by content,
so one fine-tune learns each, and so the answer formats differ: an expert that learns one skill
does not learn another by accident, which is what makes the zoo a testbed where merging must
trade skills off against each other.

The cross-skill task ``shout`` (reverse letters and upper-case them) is never trained on: it
measures whether a merge composes two experts' skills.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from evomerge.zoo_config import TRAINED_SKILLS

Item = dict[str, object]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Common English words: the base knows their spelling, so "upper" teaches a format and a casing
# the base already half has; a memorized digit->letter cipher in its place was lost by every
# uniform merge (0.00-0.02), this keeps 0.4-0.9 of it.
_WORDS = """apple river green house table water light stone bread chair cloud dream earth flower garden
heart horse money music night ocean paper plant queen smile snake sugar sweet tiger train voice
watch whale world young bird book cake city door fish game hand king lake lion milk moon nose rain
road rose ship shoe song star tree wind wolf wood yard bell blue bone cold dark fire gold hill iron
kind lamp leaf mind rock salt sand seed snow soft tall wall warm wild wise baby boat bowl corn duck
farm frog gift girl glass grass juice knife lemon mouse onion pearl piano radio robot sheep spoon
storm sword tooth towel truck zebra""".split()


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _digits(rng: random.Random, low: int, high: int) -> list[str]:
    return [str(rng.randint(0, 9)) for _ in range(rng.randint(low, high))]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"add: {a}+{b} =", str(a + b)


def _add_distractors(rng: random.Random, answer: str) -> list[str]:
    value = int(answer)
    return [str(value + d) for d in rng.sample([-10, -2, -1, 1, 2, 10], 3)]


def _reverse(rng: random.Random) -> tuple[str, str]:
    # Letters are spaced so each is one token: the skill is reordering, not BPE spelling, which a
    # 135M model cannot learn from a few thousand examples (unspaced pseudo-words stalled at 83%).
    symbols = list(_pseudo_word(rng))
    return f"reverse: {' '.join(symbols)} =", " ".join(reversed(symbols))


def _reverse_distractors(rng: random.Random, answer: str) -> list[str]:
    symbols = answer.split()
    options = {" ".join(reversed(symbols)), " ".join(symbols[1:] + symbols[:1]), " ".join(sorted(symbols))}
    options.discard(answer)
    while len(options) < 3:
        options.add(" ".join(rng.sample(symbols, len(symbols)) + [rng.choice(_VOWELS)]))
    return sorted(options)[:3]


def _sort(rng: random.Random) -> tuple[str, str]:
    # Unspaced digits: spaced digit lists looked like the reversal items and merges confused the
    # two skills (sort kept 0.01 of its accuracy under uniform task arithmetic, unspaced 0.26).
    digits = _digits(rng, 4, 6)
    return f"sort: {''.join(digits)} =", "".join(sorted(digits))


def _sort_distractors(rng: random.Random, answer: str) -> list[str]:
    digits = list(answer)
    options = {"".join(sorted(digits, reverse=True))}
    for _ in range(10):
        shuffled = digits[:]
        rng.shuffle(shuffled)
        options.add("".join(shuffled))
    options.discard(answer)
    while len(options) < 3:  # all digits equal: no shuffle differs, so change one digit
        wrong = digits[:]
        wrong[rng.randrange(len(wrong))] = str((int(wrong[0]) + rng.randint(1, 9)) % 10)
        options.add("".join(wrong))
    return rng.sample(sorted(options), 3)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(1, 2))
    return f"upper: {' '.join(words)} =", " ".join(w.upper() for w in words)


def _upper_distractors(rng: random.Random, answer: str) -> list[str]:
    words = answer.split()
    options = {answer.lower(), " ".join(w.capitalize() for w in words), " ".join(reversed(words))}
    options.discard(answer)
    while len(options) < 3:
        wrong = list(answer)
        spot = rng.randrange(len(wrong))
        if wrong[spot] != " ":
            wrong[spot] = rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        options.add("".join(wrong))
        options.discard(answer)
    return sorted(options)[:3]


def _shout(rng: random.Random) -> tuple[str, str]:
    letters = list(_pseudo_word(rng))
    return f"reverse upper: {' '.join(letters)} =", " ".join(c.upper() for c in reversed(letters))


def _shout_distractors(rng: random.Random, answer: str) -> list[str]:
    letters = answer.split()
    options = {answer.lower(), " ".join(reversed(letters)), " ".join(reversed(letters)).lower()}
    options.discard(answer)
    while len(options) < 3:
        options.add(" ".join(rng.sample(letters, len(letters))))
        options.discard(answer)
    return sorted(options)[:3]


@dataclass(frozen=True)
class Skill:
    """A named item generator. Which skills exist and which train an expert are the config's
    name lists (it checks a zoo config against them); this is how each one's items are made."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    distract: Callable[[random.Random, str], list[str]]

    @property
    def trained(self) -> bool:
        """False for cross-skill probes no expert learns."""
        return self.name in TRAINED_SKILLS

    def item(self, rng: random.Random) -> Item:
        prompt, answer = self.make(rng)
        choices = [answer, *self.distract(rng, answer)]
        rng.shuffle(choices)
        return {"prompt": prompt, "answer": answer, "choices": choices, "label": choices.index(answer)}


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "two-digit addition", _add, _add_distractors),
        Skill("reverse", "reverse the spaced letters of a pseudo-word", _reverse, _reverse_distractors),
        Skill("sort", "sort 4-6 digits ascending", _sort, _sort_distractors),
        Skill("upper", "upper-case one or two English words", _upper, _upper_distractors),
        Skill("shout", "reverse spaced letters and upper-case them (needs reverse + upper)", _shout,
              _shout_distractors),
    )
}


def _draw(skill: Skill, rng: random.Random, seen: set[str], size: int, split: str) -> list[Item]:
    """``size`` items whose prompts are not in ``seen`` (which they join)."""
    items: list[Item] = []
    attempts = 0
    while len(items) < size:
        attempts += 1
        if attempts > 50 * size + 1000:
            raise ValueError(f"skill {skill.name!r} cannot produce {size} distinct {split} items")
        item = skill.item(rng)
        if item["prompt"] in seen:
            continue
        seen.add(str(item["prompt"]))
        items.append(item)
    return items


def make_splits(skill: Skill, sizes: dict[str, int], seed: int) -> dict[str, list[Item]]:
    """Disjoint splits by prompt, deterministic for (skill, sizes, seed).

    Evaluation splits are drawn first so their size never depends on the train size; a prompt
    seen in one split is never reused in another, so test accuracy is held out for real.
    """
    rng = random.Random(f"{seed}:{skill.name}")
    seen: set[str] = set()
    order = sorted(sizes, key=lambda name: name == "train")
    return {split: _draw(skill, rng, seen, sizes[split], split) for split in order}


def extend_split(skill: Skill, splits: dict[str, list[Item]], split: str, size: int, seed: int) -> list[Item]:
    """``splits[split]`` grown to ``size`` items (or cut to its first ``size``).

    The new items come from a stream of their own and avoid every prompt of every split, so
    a larger evaluation split needs no change to the training data: experts fine-tuned on
    ``splits`` stay valid, and the first items are exactly the split they were built with.
    """
    have = splits[split]
    if size <= len(have):
        return have[:size]
    seen = {str(item["prompt"]) for items in splits.values() for item in items}
    rng = random.Random(f"{seed}:{skill.name}:{split}:extension")
    return have + _draw(skill, rng, seen, size - len(have), split)
