"""The zoo card: every model's score on every task, and whether the zoo is a useful testbed.

A zoo is worth searching only if each expert masters its own skill while the base does not, and
uniform merges keep part of each skill but fall clearly short of the experts. The card measures
exactly that (plus the cross-skill probe) so a reader can check it instead of trusting it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from evomerge.fitness.native import generate_exact_match
from evomerge.merge.engine import Merger
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

SPLITS = ("validation", "test")
OWN_SKILL_MIN = 0.9  # an expert must reach this on its own skill
BASE_GAP_MIN = 0.4  # ... and the base must be at least this far below it
ROOM_MIN = 0.10  # the best uniform merge must trail the experts' mean by this much
KEEP_MIN = 0.10  # ... yet some uniform merge must beat the base by this much on every skill


def task_arithmetic(pool_experts: list[str], num_layers: int, coefficients: dict[str, float]) -> Recipe:
    """θ = θ_base + Σ c_i τ_i as a recipe: the base (all c = 0), one expert, or a uniform merge."""
    config = MethodConfig("task_arithmetic", {name: ExpertParams(weight=coefficients.get(name, 0.0))
                                              for name in pool_experts})
    return Recipe.uniform("base", pool_experts, num_layers, config)


def score_models(zoo, merger: Merger, log: Callable[[str], None]) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy of base, each expert and each uniform merge on every task and split."""
    skills = [*zoo.config.skills, *zoo.config.probes]
    items = {(s, split): zoo.items(s, split) for s in skills for split in SPLITS}
    models: dict[str, dict[str, float]] = {"base": {}}
    models.update({name: {name: 1.0} for name in merger.experts})
    models.update({f"task_arithmetic@{lam:g}": {name: lam for name in merger.experts}
                   for lam in zoo.config.merge_scales})
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, coefficients in models.items():
        model = merger.materialize(task_arithmetic(merger.experts, merger.num_layers, coefficients))
        results[label] = {split: {} for split in SPLITS}
        for (skill, split), rows in items.items():
            outcome = generate_exact_match(model, merger.tokenizer, [r["prompt"] for r in rows],
                                           [r["answer"] for r in rows])
            results[label][split][skill] = sum(o.correct for o in outcome) / len(outcome)
        log(f"card: {label:>22}  " + "  ".join(f"{s} {results[label]['test'][s]:.2f}" for s in skills))
    return results


def assess(zoo, scores: dict) -> dict[str, object]:
    """The testbed criteria, each with the numbers that decide it."""
    skills = list(zoo.config.skills)
    test = {label: s["test"] for label, s in scores.items()}
    own = {skill: test[skill][skill] for skill in skills}
    base = {skill: test["base"][skill] for skill in skills}
    mean = lambda row: sum(row[s] for s in skills) / len(skills)  # noqa: E731
    uniform = {label: row for label, row in test.items() if label.startswith("task_arithmetic")}
    merges = {label: mean(row) for label, row in uniform.items()}
    best_merge = max(merges, key=merges.get)
    # Per skill, the most any uniform merge keeps of it: a testbed needs every skill partly kept.
    kept = {s: max(row[s] for row in uniform.values()) for s in skills}
    expert_mean = sum(own.values()) / len(own)
    probe_best = {p: max(((label, row[p]) for label, row in test.items() if not label.startswith("task_")),
                         key=lambda pair: pair[1]) for p in zoo.config.probes}
    return {
        "experts_master_own_skill": all(v >= OWN_SKILL_MIN for v in own.values()),
        "base_far_below": all(own[s] - base[s] >= BASE_GAP_MIN for s in skills),
        "uniform_merges_keep_part": all(kept[s] >= base[s] + KEEP_MIN for s in skills),
        "uniform_merges_fall_short": merges[best_merge] <= expert_mean - ROOM_MIN,
        "own_skill_test": own,
        "expert_mean_test": expert_mean,
        "best_uniform_merge": best_merge,
        "best_uniform_merge_mean_test": merges[best_merge],
        "most_kept_by_a_uniform_merge": kept,
        "best_single_model_on_probe": {p: {"model": m, "test": v} for p, (m, v) in probe_best.items()},
    }


def card_markdown(card: dict) -> str:
    tasks = [*card["config"]["skills"], *card["config"]["probes"]]
    lines = [
        f"# evomerge zoo `{card['name']}`", "",
        f"Base: {card['base']}. Experts: {_experts_text(card['config'])}, one per skill. "
        "Scores: exact-match accuracy, validation / test.", "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for label, row in card["scores"].items():
        cells = [f"{row['validation'][t]:.2f} / {row['test'][t]:.2f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| expert | ‖τ‖/‖θ‖ | steps | train loss start → end | fine-tune seconds |", "|---|---|---|---|---|"]
    for skill, norm in card["relative_norms"].items():
        t = card["training"][skill]
        lines.append(f"| {skill} | {norm:.4f} | {t['steps']} | {t['loss_start']:.3f} → {t['loss_end']:.3f} "
                     f"| {t['seconds']:.0f} |")
    a = card["assessment"]
    lines += ["", "Testbed criteria (test split):", ""]
    for key in ("experts_master_own_skill", "base_far_below", "uniform_merges_keep_part", "uniform_merges_fall_short"):
        lines.append(f"- {key.replace('_', ' ')}: {'yes' if a[key] else 'NO'}")
    lines.append(f"- best uniform merge: {a['best_uniform_merge']} with mean {a['best_uniform_merge_mean_test']:.2f} "
                 f"vs experts' own-skill mean {a['expert_mean_test']:.2f}")
    lines.append("- most of each skill any uniform merge keeps: "
                 + ", ".join(f"{s} {v:.2f}" for s, v in a["most_kept_by_a_uniform_merge"].items()))
    for probe, best in a["best_single_model_on_probe"].items():
        lines.append(f"- cross-skill probe {probe}: best single model is {best['model']} at {best['test']:.2f}")
    lines += ["", f"This build run took {card['build_seconds'] / 60:.1f} min on {card.get('cpus', '?')} CPUs "
              "(stages already in the cache are reused, not re-run or counted)."]
    return "\n".join(lines) + "\n"


def _experts_text(config: dict) -> str:
    if config.get("experts", "full") == "lora":
        lora = config["lora"]
        return (f"peft LoRA adapters of the base (rank {lora['rank']}, alpha {lora['alpha']:g}, "
                f"{lora['target_modules']})")
    return "full fine-tunes of the base"


def write_card(zoo, training: dict, started: float, log: Callable[[str], None] = print) -> dict:
    import dataclasses

    from evomerge.zoo.base import SOURCES

    pool = ModelPool(str(zoo.base), {skill: str(path) for skill, path in zoo.experts.items()})
    norms = pool.relative_norms()
    scores = score_models(zoo, Merger(pool), log)
    card = {
        "name": f"{zoo.config.name}-{zoo.config.fingerprint()}",
        "base": (SOURCES[zoo.config.kind].text() if zoo.config.kind in SOURCES
                 else "pico: random 4-layer Llama, character tokenizer"),
        "config": dataclasses.asdict(zoo.config),
        "relative_norms": norms,
        "training": training,
        "scores": scores,
    }
    card["assessment"] = assess(zoo, scores)
    card["build_seconds"] = time.perf_counter() - started  # scoring included: it is part of a build
    card["cpus"] = os.cpu_count()
    (zoo.root / "README.md").write_text(card_markdown(card))
    tmp = zoo.card_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2))
    tmp.rename(zoo.card_path)
    return card
