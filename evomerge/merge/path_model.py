"""Layer paths as models: run one without copying a weight, or fold it into an ordinary model.

A worker evaluates many paths over the same few source models, so it keeps each source
materialized once (:class:`PathSources`) and builds a path's model as a standard model of the
same class with ``len(path)`` blocks whose tensors *are* the sources' tensors (``assign``: no
copy). Each step is its own block object, with its own index, so the KV cache gives a block
visited twice a slot per visit. A slice's entry scale is a forward pre-hook on its first block.

For export the same path is :func:`folded` into weights a plain ``from_pretrained`` loads: the
hook's scaling moves into the residual writes of that step and every later one (the family's
writers, :mod:`evomerge.architecture`, divided by the cumulative scale), which in a pre-norm
transformer computes the same logits up to the norms' epsilon. Blocks are found and renumbered by
the merger's :class:`~evomerge.architecture.Layout`, so any decoder family runs.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from evomerge.architecture import Layout
from evomerge.layer_path import LayerPath, source_recipe
from evomerge.merge.engine import Merger


class PathSources:
    """The source models of a merger's pool, each materialized on first use and kept: a worker
    then holds its merger plus one model per source (base, experts, PS merge)."""

    def __init__(self, merger: Merger) -> None:
        self.merger = merger
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, path: LayerPath, source: str) -> torch.nn.Module:
        recipe = source_recipe(path, source)
        if recipe.hash not in self._models:
            # Not a deepcopy of the working model: it carries the worker's forward hooks, and
            # copying a bound method copies its owner (the whole worker, merger and all).
            template = self.merger.model
            # one new tensor per name; ``_filled`` ties tied names back into one parameter
            state = {name: torch.empty_like(t) for name, t in template.state_dict().items()}
            model = _filled(template, copy.deepcopy(template.config), state, self.merger.layout)
            self._models[recipe.hash] = self.merger.materialize(recipe, into=model)
            self.merger.drop_statistics()  # a source is merged once; its statistics would stay for nothing
        return self._models[recipe.hash]


def path_model(path: LayerPath, sources: PathSources) -> torch.nn.Module:
    """A model running ``path`` over the sources' resident tensors (shared, not copied)."""
    model = _assembled(path, sources, lambda name, tensor, scale: tensor)
    blocks = model.get_submodule(sources.merger.layout.blocks)
    step = 0
    for piece in path.slices:
        if piece.scale != 1.0:
            blocks[step].register_forward_pre_hook(_scaling(piece.scale))
        step += piece.length
    return model


def folded(path: LayerPath, sources: PathSources) -> torch.nn.Module:
    """A standalone model with ``path``'s blocks copied and its scales folded into the weights."""
    layout = sources.merger.layout
    layout.writers()  # a family the fold is wrong for is refused before any block is copied

    def copied(name: str, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        # Each step its own copy (a block visited twice is stored twice); tied names outside the
        # blocks are tied back into one parameter by ``_filled``.
        if layout.is_residual_writer(name):
            return layout.scaled_write(name, tensor, 1.0 / scale)
        return tensor.clone()

    return _assembled(path, sources, copied)


def _assembled(path: LayerPath, sources: PathSources,
               tensor_for: Callable[[str, torch.Tensor, float], torch.Tensor]) -> torch.nn.Module:
    """The path's model with each tensor as ``tensor_for(name, tensor, cumulative scale)`` gives it."""
    layout = sources.merger.layout
    outside = sources.model(path, path.outside)
    steps = path.steps()
    config = copy.deepcopy(outside.config)
    config.num_hidden_layers = len(steps)
    if getattr(config, "layer_types", None):  # per-block kinds (sliding windows) follow their blocks
        config.layer_types = [config.layer_types[layer] for _, layer, _ in steps]
    state = {name: tensor_for(name, tensor, 1.0) for name, tensor in outside.state_dict(keep_vars=False).items()
             if layout.layer_of(name) is None}
    by_source = {}
    for step, (source, layer, scale) in enumerate(steps):
        if source not in by_source:
            by_source[source] = _block_tensors(sources.model(path, source).state_dict(), layout)
        for name, tensor in by_source[source][layer].items():
            renamed = layout.renumbered(name, step)
            state[renamed] = tensor_for(renamed, tensor, scale)
    return _filled(outside, config, state, layout)


def _filled(template: torch.nn.Module, config, state: dict[str, torch.Tensor], layout: Layout) -> torch.nn.Module:
    """A model of ``template``'s class built for ``config`` on the meta device (no memory) whose
    tensors are ``state``'s, taken as they are; buffers outside the state dict (rotary
    frequencies) are ``template``'s."""
    with torch.device("meta"):
        model = type(template)(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # tied tensors become one parameter again, as in a loaded model
    buffers = dict(template.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            source_name = layout.renumbered(name, 0) if layout.layer_of(name) is not None else name
            model.get_submodule(owner).register_buffer(leaf, buffers.get(name, buffers.get(source_name)),
                                                       persistent=False)
    model.generation_config = copy.deepcopy(template.generation_config)
    return model.eval()


def _block_tensors(state: dict[str, torch.Tensor], layout: Layout) -> dict[int, dict[str, torch.Tensor]]:
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        layer = layout.layer_of(name)
        if layer is not None:
            blocks.setdefault(layer, {})[name] = tensor
    return blocks


def _scaling(scale: float):
    def hook(module, args):
        return (args[0] * scale, *args[1:])
    return hook
