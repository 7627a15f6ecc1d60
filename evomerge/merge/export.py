"""Export one recipe as what a user takes away: a Hugging Face model folder, the recipe, and the
mergekit config that redoes the merge without evomerge.

The folder is written next to its destination and renamed into place at the end, so a crash or a
full disk leaves either the previous export or none, never a half-written model that loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from evomerge.architecture import Layout, layout_of
from evomerge.errors import DiskError, UserError
from evomerge.merge.engine import Merger
from evomerge.layer_path import LayerPath, Plan


def check_destination(out_dir: str | Path, force: bool) -> Path:
    """``out_dir`` as a Path, refused in one line when it exists and ``force`` is off: an export
    into a folder someone already has is a choice to make, not a default. Call it before the
    merge, so the refusal costs nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"export folder {out_dir} already exists; replace it with --force "
                        f"(force=True in Python) or choose another --out")
    return out_dir


def export(recipe: Plan, source: Merger | torch.nn.Module, out_dir: str | Path, *,
           tokenizer=None, scores: Mapping[str, float] | None = None, provenance: str | None = None,
           max_shard_size: str = "2GB", force: bool = False) -> Path:
    """Write ``out_dir/model/`` (safetensors, config, tokenizer, generation config, README model
    card), ``out_dir/recipe.yaml`` and ``out_dir/mergekit.yaml``; returns ``out_dir``.

    ``source`` is a Merger, which materializes ``recipe`` into its working model (a layer path:
    into a model of the path's depth, its scales folded into the weights) and supplies its
    pool's tokenizer, or a model already holding the recipe's weights, with ``tokenizer`` given.
    The weights are saved in the model's dtype. mergekit.yaml is left out, with the reason in the
    model card, when mergekit cannot express the recipe. An existing ``out_dir`` is refused
    unless ``force``; with it, the old folder is replaced whole at the end, never half-overwritten.
    ``provenance``: how the recipe was found where the recipe alone does not say (a gradient
    refinement's parent, steps and seed), for the card.
    """
    out_dir = check_destination(out_dir, force)
    model, tokenizer = _model_and_tokenizer(recipe, source, tokenizer)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    except OSError as error:
        raise DiskError.of(out_dir.parent, error, "nothing was written; choose another --out") from None
    try:
        (staging / "recipe.yaml").write_text(recipe.to_yaml())
        inputs = source.model if isinstance(source, Merger) else model  # what mergekit would read
        mergekit_note = _write_mergekit(recipe, staging / "mergekit.yaml", layout_of(inputs), inputs)
        model.save_pretrained(staging / "model", max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging / "model")
        card = model_card(recipe, scores, mergekit_note, _name(model.dtype), provenance)
        (staging / "model" / "README.md").write_text(card)
        _replace(staging, out_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous export there is intact" if out_dir.exists() else "nothing was left behind"
        raise DiskError.of(out_dir, error, f"{kept}; free space or choose another --out") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _model_and_tokenizer(recipe: Plan, source: Merger | torch.nn.Module, tokenizer):
    if isinstance(source, Merger) and isinstance(recipe, LayerPath):
        from evomerge.merge.path_model import PathSources, folded

        return folded(recipe, PathSources(source)), tokenizer or source.tokenizer
    if isinstance(source, Merger):
        return source.materialize(recipe), tokenizer or source.tokenizer
    if tokenizer is None:
        raise UserError("exporting a model needs its tokenizer; pass tokenizer= or a Merger")
    return source, tokenizer


def _write_mergekit(recipe: Plan, path: Path, layout: Layout, source_model: torch.nn.Module) -> str | None:
    """Write the mergekit config; the reason instead when mergekit cannot express the recipe."""
    from evomerge.mergekit_config import check_mergekit_reads, to_mergekit_yaml

    try:
        text = to_mergekit_yaml(recipe, layout)
        check_mergekit_reads(source_model.config, set(source_model.state_dict()))
        _check_rows(recipe, source_model)
    except UserError as error:
        return str(error)
    path.write_text(text)
    return None


def _check_rows(recipe: Plan, source_model: torch.nn.Module) -> None:
    """Refuse a row-wise method over transposed weights: evomerge ranks a Conv1D weight's output
    rows, mergekit the rows as stored (inputs), so the two would merge different models."""
    from evomerge.architecture import transposed_weights
    from evomerge.merge import registry

    if isinstance(recipe, LayerPath) or not transposed_weights(source_model):
        return
    for _, config in recipe.method_configs():
        if registry.method(config.method).reads_rows(config.params):
            raise UserError(f"{config.method} works row by row and {type(source_model).__name__} stores "
                            f"weights transposed (Conv1D), which mergekit would rank as stored rows; "
                            f"the merged model folder is the export")


def model_card(recipe: Plan, scores: Mapping[str, float] | None, mergekit_note: str | None,
               dtype: str, provenance: str | None = None) -> str:
    """The README a model hub shows: what was merged how, how it scored, how to redo it."""
    experts = ", ".join(recipe.experts)
    made = (f"blocks of `{recipe.base}` and of its experts {experts} stacked along a path, the path's scales "
            f"folded into the weights" if isinstance(recipe, LayerPath) else f"`{recipe.base}` merged with {experts}")
    lines = ["---", "library_name: transformers", "tags: [merge, evomerge]", "---", "",
             f"# Merge {recipe.hash}", "",
             f"Found by evomerge: {made}.", "",
             f"**Recipe:** {recipe.summary()}", "", f"Weights are stored in {dtype}.", ""]
    if provenance:
        lines += [provenance, ""]
    if scores:
        lines += ["## Scores", "", "| objective | score |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
        lines.append("")
    lines += ["## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "", "## mergekit", ""]
    if mergekit_note is None:
        lines.append("`mergekit.yaml` beside this folder redoes the merge: "
                     "`mergekit-yaml mergekit.yaml out/`.")
    else:
        lines.append(f"No mergekit config: {mergekit_note}.")
    return "\n".join(lines) + "\n"


def _replace(staging: Path, out_dir: Path) -> None:
    """Put ``staging`` at ``out_dir``; a previous export there is moved aside first and removed
    only once the new one is in place."""
    previous = None
    if out_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.rename(out_dir, previous / out_dir.name)
    os.rename(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
