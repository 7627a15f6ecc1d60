"""``evomerge export``: the picked candidate of a run, materialized from its own base and experts.

Above the reports (it reads the pick from the run folder) and the merge engine (it loads the
models): the one report command that touches weights."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import UserError
from evomerge.layer_path import plan_from_dict
from evomerge.report.run_data import held_out_scores, pick, pick_label
from evomerge.run import ArchiveEntry, RunDir


def export_pick(run: RunDir, spec: str, out_dir: str | Path | None = None, *,
                device: str = "cpu", force: bool = False) -> tuple[ArchiveEntry, Path]:
    """Materialize the picked recipe from its own base and experts and export it (model folder,
    recipe.yaml, mergekit.yaml) to ``out_dir`` (default: ``RUN/exports/<pick label>``); the
    model card lists its objectives and its validation and test scores. An existing folder is
    refused before anything loads, unless ``force``."""
    import torch

    from evomerge.merge.engine import Merger
    from evomerge.merge.export import check_destination, export
    from evomerge.pool import ModelPool

    entry = pick(run, spec)
    out = check_destination(out_dir if out_dir is not None else run.export_dir(pick_label(spec)), force)
    recipe = plan_from_dict(entry.recipe)
    dtype = getattr(torch, recipe.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"recipe dtype {recipe.dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    pool = ModelPool(recipe.base, {n: recipe.expert_refs.get(n, n) for n in recipe.experts},
                     device=device)
    merger = Merger(pool, device=device, dtype=dtype)
    tests = held_out_scores(run).get(entry.recipe_hash) or {}
    scores = {**{f"{t} (validation)": v for t, v in entry.scores.items()},
              **{f"{t} (test)": v for t, v in tests.items()},
              **{o: v for o, v in entry.objectives.items() if o not in entry.scores}}
    return entry, export(recipe, merger, out, scores=scores, provenance=provenance(entry), force=force)


def provenance(entry: ArchiveEntry) -> str | None:
    """How a candidate no algorithm asked for was made, for its model card: enough to redo it."""
    refine = (entry.origin or {}).get("refine")
    if not refine:
        return None
    anchors = refine.get("anchors")
    on = (f" on functional dual anchors ({anchors['count']} per expert and block, built by {anchors['steps']} "
          f"steps of learning rate {anchors['lr']:g} from {anchors['init']} inputs, seed {anchors['seed']})"
          if anchors else "")
    return (f"**Refined** from archive entry {entry.origin['parent']} by {refine['steps']} Adam steps "
            f"(learning rate {refine['lr']:g}, {refine['signal']} signal, seed {refine['seed']}){on} on per-block "
            f"expert weights; the recipe above is the result, so the merge redoes without the steps.")
