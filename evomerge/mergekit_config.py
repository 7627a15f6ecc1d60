"""mergekit configs to and from recipes, resolved as mergekit resolves them.

A recipe found here must redo the same merge with ``mergekit-yaml``, and a mergekit config a user
already has must seed a search, so both directions follow mergekit 0.1.x's semantics: ``models``
and ``slices`` forms, ``filter`` conditions (first match wins) and gradients over a slice's
layers. Which methods and parameters mergekit has, and its defaults, are read off the method
registry, where each method declares them once.

mergekit filters match substrings of tensor names. An export filters on the names of the pool's
:class:`~evomerge.architecture.Layout` (default: Llama's, ``model.layers.N.self_attn.*``,
``model.layers.N.mlp.*``), and is refused for an architecture mergekit has no definition of.
Reading a config resolves its filters against Llama names (``model.embed_tokens``, ``model.norm``,
``lm_head``), as in the zoo's SmolLM2 and in Mistral, Qwen2 and most merged families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from evomerge.architecture import Layout, llama_layout
from evomerge.errors import UserError
from evomerge.merge import registry
from evomerge.merge.params import Param
from evomerge.layer_path import BASE, MERGE, LayerPath, Plan
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe
from evomerge.serialization import checked_mapping, dump_yaml, load_yaml, short_repr

# Top-level keys that do not change merged weights of same-vocabulary models (evomerge's pools
# require one vocabulary), and a parameter that only changes how masks are stored.
_MERGEKIT_IGNORED = ("tokenizer_source", "tokenizer", "chat_template", "out_dtype")
_IGNORED_PARAMS = ("int8_mask",)

# Tensor names standing for each kind when resolving a mergekit config's filters.
_PROBES = {
    "attn": tuple(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    "mlp": tuple(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "all": ("input_layernorm.weight", "post_attention_layernorm.weight"),
}
_PRE_WEIGHTS = ("model.embed_tokens.weight",)
_POST_WEIGHTS = ("model.norm.weight", "lm_head.weight")


def to_mergekit(plan: Plan, layout: Layout | None = None) -> dict[str, Any]:
    """A mergekit config doing the same merge as a recipe or a layer path on a model of
    ``layout`` (default: Llama names)."""
    if isinstance(plan, LayerPath):
        return _path_to_mergekit(plan, layout)
    return _recipe_to_mergekit(plan, layout)


def to_mergekit_yaml(plan: Plan, layout: Layout | None = None) -> str:
    return dump_yaml(to_mergekit(plan, layout))


def _path_to_mergekit(path: LayerPath, layout: Layout | None = None) -> dict[str, Any]:
    """A mergekit ``passthrough`` config stacking the same slices, each slice's scales folded
    into its residual writes (``scale`` filtered on ``layout``'s writers, by default Llama's
    o_proj and down_proj: scaling the hidden state entering a block by s equals, in a pre-norm
    transformer and up to the norms' epsilon, scaling these writes of that block and every later
    one by 1/s). mergekit takes the
    embeddings from the first slice's model and the final norm and head from the last one's,
    so a path whose outside source differs cannot be expressed; nor can a path through the PS
    merge, which is no model on disk."""
    if MERGE in {s.source for s in path.slices} | {path.outside}:
        raise UserError("the path runs through the parameter-space merge, which mergekit would have to "
                        "build first: export that recipe, then stack its folder")
    if path.slices[0].source != path.outside or path.slices[-1].source != path.outside:
        raise UserError(f"mergekit takes the embeddings from the first slice's model "
                        f"({path.slices[0].source}) and the head from the last one's ({path.slices[-1].source}); "
                        f"this path takes both from {path.outside}")
    layout = layout or llama_layout(path.num_layers)
    writers = layout.writers()
    check_mergekit_knows(layout)
    if layout.family is not None and layout.family.writer_offset and any(p.scale != 1.0 for p in path.slices):
        raise UserError(f"mergekit's scale multiplies a weight, but {layout.model_type}'s residual writes are "
                        f"norms computing x * ({layout.family.writer_offset:g} + weight), so this path's scales "
                        f"cannot fold into a mergekit config; the exported model folder has them folded")
    refs = {BASE: path.base, **{e: mergekit_model(path.expert_refs.get(e, e), path.base) for e in path.experts}}
    out, total = [], 1.0
    for piece in path.slices:
        total *= piece.scale
        source: dict[str, Any] = {"model": refs[piece.source], "layer_range": [piece.start, piece.end]}
        if total != 1.0:
            fold = float(f"{1 / total:.12g}")
            source["parameters"] = {"scale": [{"filter": mark, "value": fold}
                                              for mark in writers] + [{"value": 1.0}]}
        out.append({"sources": [source]})
    return {"slices": out, "merge_method": "passthrough", "dtype": path.dtype}


def _recipe_to_mergekit(recipe: Recipe, layout: Layout | None = None) -> dict[str, Any]:
    """A mergekit config doing the same merge: the ``models`` form when every block shares
    one layout, else one slice per run of layers between group boundaries. attn/mlp and
    outside values become ``filter`` lists (mergekit takes embeddings' parameters from the
    first slice and the final norm's and head's from the last, so outside values go there
    behind a ``layers.`` filter). Raises UserError for what mergekit cannot express: more than
    one method, a method mergekit lacks, experts merged in some places but not others, and
    normalize/rescale left to the default for some tensors of a slice but set for others, and
    a ``layout`` (default: Llama's) whose architecture mergekit has no definition of."""
    layout = layout or llama_layout(recipe.num_layers)
    check_mergekit_knows(layout)
    marks = layout.marks() if any(g.component != "all" for g in recipe.groups) else {}
    labelled = list(recipe.method_configs())
    by_method: dict[str, list[str]] = {}
    for where, config in labelled:
        by_method.setdefault(config.method, []).append(where)
    if len(by_method) > 1:
        used = "; ".join(f"{m} for {', '.join(ws)}" for m, ws in by_method.items())
        raise UserError(f"mergekit applies one merge_method to the whole model, but this "
                        f"recipe uses {used}")
    method = recipe.outside.method
    spec = registry.method(method)
    if spec.mergekit is None:
        exporting = sorted(name for name, s in registry.METHODS.items() if s.mergekit)
        raise UserError(f"merge method {method!r} has no mergekit equivalent; methods that "
                        f"export: {', '.join(exporting)}")
    names = [e for e in recipe.experts if e in recipe.outside.experts]
    for where, config in labelled:
        if set(config.experts) != set(names):
            raise UserError(f"mergekit merges the same models everywhere, but {where} merges "
                            f"{sorted(config.experts)} and outside merges {sorted(names)}")

    configs = [c for _, c in labelled]
    # mergekit's defaults are the registry's, so only what differs from them (and what
    # mergekit requires) is written.
    expert_keys = [p.name for p in spec.expert_params if p.mergekit_required or any(
        e[p.name] != p.default for c in configs for e in c.experts.values())]
    global_keys = [p.name for p in spec.global_params if p.mergekit_required or any(
        c.get(p.name) != p.default for c in configs)]

    cuts = sorted({0, recipe.num_layers} | {g.start for g in recipe.groups}
                  | {g.end for g in recipe.groups})
    segments = list(zip(cuts, cuts[1:]))
    with_base = spec.needs_base
    out: dict[str, Any] = {"merge_method": method}
    if with_base:
        out["base_model"] = recipe.base
    out["dtype"] = recipe.dtype
    slices = []
    for index, (start, end) in enumerate(segments):
        kinds = {"attn": recipe.config_for(start, "attn"), "mlp": recipe.config_for(start, "mlp"),
                 "all": recipe.config_for(start, "all")}
        kinds["outside"] = recipe.outside if index in (0, len(segments) - 1) else kinds["all"]
        where = f"layers [{start}, {end})"
        sources = [{"model": recipe.base}] if with_base else []
        for name in names:
            params = _settings(expert_keys, kinds, lambda c, key: c.experts[name][key], marks,
                               layout.in_block_mark)
            sources.append({"model": mergekit_model(recipe.expert_refs.get(name, name), recipe.base),
                            "parameters": params})
        shared = _settings(global_keys, kinds, MethodConfig.get, marks, layout.in_block_mark)
        slices.append((start, end, sources, shared))
    if len(slices) == 1:
        _, _, sources, shared = slices[0]
        if shared:
            out["parameters"] = shared
        out["models"] = sources
    else:
        out["slices"] = [{"sources": [{"model": s["model"], "layer_range": [start, end],
                                       **({"parameters": s["parameters"]} if "parameters" in s
                                          else {})} for s in sources],
                          **({"parameters": shared} if shared else {})}
                         for start, end, sources, shared in slices]
    return out


def from_mergekit(config: dict[str, Any] | str,
                  expert_names: Mapping[str, str] | None = None,
                  num_layers: int | None = None, *, base: str | None = None) -> Recipe:
    """The recipe a mergekit config (``models`` or ``slices`` form, with filters and
    gradients) amounts to, resolved per layer exactly as mergekit resolves it; layers whose
    values vary along a gradient get one group each. ``expert_names`` maps model references
    to names (default: the reference's last path component); ``num_layers`` is needed for the
    ``models`` form, ``base`` when the config has no base_model (linear)."""
    data = load_yaml(config, "mergekit config") if isinstance(config, str) else config
    checked_mapping(data, "mergekit config", required=("merge_method",),
             optional=("base_model", "dtype", "parameters", "models", "slices")
             + _MERGEKIT_IGNORED)
    method = data["merge_method"]
    if not isinstance(method, str):
        raise UserError(f"merge_method must be a name, got {short_repr(method)}")
    spec = registry.method(method)
    with_base = spec.needs_base
    if not with_base and data.get("base_model") is not None:
        raise UserError(f"a {method} merge in mergekit counts base_model "
                        f"{short_repr(data['base_model'])} as one more input, which a recipe "
                        f"cannot express; drop base_model and pass base=")
    base_ref = data.get("base_model", base)
    if base_ref is None:
        raise UserError("the mergekit config has no base_model; pass base= (the model the "
                        "experts were fine-tuned from)")
    base_ref = _ref(base_ref, "base_model")
    top = _params(data.get("parameters"), "parameters")
    if ("models" in data) == ("slices" in data):
        raise UserError("a mergekit config needs exactly one of 'models' or 'slices'")
    slices = (_read_models(data["models"], num_layers, base_ref if with_base else None)
              if "models" in data else _read_slices(data["slices"], num_layers, base_ref))
    total = slices[-1][1]
    slices = [(start, end, [(_expert_ref(ref, base_ref, f"layers [{start}, {end})"), params)
                            for ref, params in sources], shared) for start, end, sources, shared in slices]

    expert_refs = _expert_refs(slices, base_ref, with_base)
    given = dict(expert_names or {})
    for ref in given:
        if ref not in expert_refs:
            raise UserError(f"expert_names names {short_repr(ref)}, which is not an expert model "
                            f"of this config ({', '.join(expert_refs)})")
    names = {ref: given.get(ref) or ref.rstrip("/").rsplit("/", 1)[-1] for ref in expert_refs}
    seen: dict[str, str] = {}
    for ref, name in names.items():
        if name in seen:
            raise UserError(f"models {seen[name]!r} and {ref!r} would both be named {name!r}; "
                            f"pass expert_names={{reference: name}}")
        seen[name] = ref

    def config_at(piece: _Slice, tensor: str, t: float) -> MethodConfig:
        def value(param: Param, scopes: Sequence[Mapping[str, Any]]) -> Any:
            for scope in scopes:
                if param.name in scope:
                    resolved = _evaluate(scope[param.name], tensor, t, param.convert,
                                         f"parameter {param.name!r}")
                    if resolved is not None:
                        return resolved
            return None  # the registry's default, which is mergekit's

        shared = (piece[3], top)
        experts = {names[ref]: ExpertParams(**{p.name: value(p, (params,) + shared)
                                               for p in spec.expert_params})
                   for ref, params in piece[2] if ref != base_ref}
        return MethodConfig(method, experts, **{p.name: value(p, shared) for p in spec.global_params})

    def resolve(probes: Sequence[tuple[_Slice, str, float]]) -> MethodConfig:
        found = {tensor: config_at(piece, tensor, t) for piece, tensor, t in probes}
        first, *rest = found
        for tensor in rest:
            if found[tensor] != found[first]:
                raise UserError(f"this mergekit config gives {first} and {tensor} different "
                                f"parameters; a recipe can differ only between attention, "
                                f"MLP, the rest of a block, and the tensors outside blocks "
                                f"(embeddings, final norm and lm_head alike)")
        return found[first]

    groups = []
    for piece in slices:
        start, end = piece[0], piece[1]
        length = end - start
        per_layer = []
        for layer in range(start, end):
            t = (layer - start) / (length - 1) if length > 1 else 1.0  # mergekit's choice
            per_layer.append({kind: resolve([(piece, f"model.layers.{layer}.{p}", t)
                                             for p in probes])
                              for kind, probes in _PROBES.items()})
        uniform = all(layer == per_layer[0] for layer in per_layer)
        spans = [(start, end)] if uniform else [(i, i + 1) for i in range(start, end)]
        for (s, e), kinds in zip(spans, per_layer):
            groups += [LayerGroup(s, e, kind, c) for kind, c in kinds.items()
                       if kind == "all" or c != kinds["all"]]
    # mergekit plans the tensors outside the blocks at t=0 of the first and last slice.
    outside = resolve([(slices[0], name, 0.0) for name in _PRE_WEIGHTS]
                      + [(slices[-1], name, 0.0) for name in _POST_WEIGHTS])
    return Recipe(base=base_ref, experts=tuple(names[r] for r in expert_refs), num_layers=total,
               groups=tuple(groups), outside=outside, dtype=data.get("dtype") or "float32",
               expert_refs={names[r]: r for r in expert_refs})


# (start, end, [(model reference, source parameters)], slice parameters)
_Slice = tuple[int, int, list[tuple[str, Mapping[str, Any]]], Mapping[str, Any]]


def _read_models(models: Any, num_layers: int | None, base_ref: str | None) -> list[_Slice]:
    """The ``models`` form is one slice over all layers; mergekit adds a missing base to it."""
    if num_layers is None:
        raise UserError("a mergekit config in the 'models:' form does not say how many layers "
                        "the model has; pass num_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise UserError(f"num_layers must be a positive integer, got {short_repr(num_layers)}")
    sources = []
    for i, entry in enumerate(_list(models, "models")):
        checked_mapping(entry, f"models[{i}]", required=("model",), optional=("parameters",))
        sources.append((_ref(entry["model"], f"models[{i}].model"),
                        _params(entry.get("parameters"), f"models[{i}].parameters")))
    if base_ref is not None and base_ref not in [ref for ref, _ in sources]:
        sources.append((base_ref, {}))
    return [(0, num_layers, sources, {})]


def _read_slices(slices: Any, num_layers: int | None, base_ref: str) -> list[_Slice]:
    """Output slices stacked in order; each source must feed its own layers (no frankenmerges)."""
    out: list[_Slice] = []
    position = 0
    for i, piece in enumerate(_list(slices, "slices")):
        where = f"slices[{i}]"
        checked_mapping(piece, where, required=("sources",),
                 optional=("parameters", "base_model", "residual_weight"))
        if piece.get("base_model") not in (None, base_ref):
            raise UserError(f"{where} has its own base_model {short_repr(piece['base_model'])}; a "
                            f"recipe has one base ({base_ref})")
        if piece.get("residual_weight") is not None:
            raise UserError(f"{where}.residual_weight {short_repr(piece['residual_weight'])} cannot "
                            f"be expressed in a recipe")
        sources, length = [], 0
        for j, source in enumerate(_list(piece["sources"], f"{where}.sources")):
            at = f"{where}.sources[{j}]"
            checked_mapping(source, at, required=("model", "layer_range"), optional=("parameters",))
            span = source["layer_range"]
            if not (isinstance(span, list) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                    and span[0] < span[1]):
                raise UserError(f"{at}.layer_range must be [start, end], got {short_repr(span)}")
            length = length or span[1] - span[0]
            if span != [position, position + length]:
                raise UserError(f"{at}.layer_range {span} would feed output layers "
                                f"[{position}, {position + length}); a recipe merges layer i of "
                                f"every model into layer i only")
            sources.append((_ref(source["model"], f"{at}.model"),
                            _params(source.get("parameters"), f"{at}.parameters")))
        out.append((position, position + length, sources, _params(piece.get("parameters"),
                                                                  f"{where}.parameters")))
        position += length
    if num_layers is not None and num_layers != position:
        raise UserError(f"the mergekit slices cover {position} layers, not num_layers={num_layers}")
    return out


def mergekit_model(ref: str, base: str) -> str:
    """How mergekit names expert ``ref``: a LoRA adapter folder is ``base+adapter`` (mergekit
    applies the adapter to the base before merging), anything else its own reference."""
    from evomerge.adapters import is_adapter_folder

    return f"{base}+{ref}" if is_adapter_folder(Path(ref).expanduser()) else ref


def _expert_ref(ref: str, base_ref: str, where: str) -> str:
    """``ref`` as an expert of ``base_ref``: mergekit's ``base+adapter`` is the adapter."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref
    model, adapter = ref.split("+", 1)
    if model != base_ref:
        raise UserError(f"{where}: {ref!r} applies a LoRA adapter to {model!r}, not to base {base_ref!r}; "
                        f"an adapter expert is written base+adapter")
    return adapter


def _expert_refs(slices: list[_Slice], base_ref: str, with_base: bool) -> list[str]:
    """The experts, which must be the same models in every slice, with the base where needed."""
    experts: list[str] | None = None
    for start, end, sources, _ in slices:
        refs = [ref for ref, _ in sources]
        where = f"layers [{start}, {end})"
        if len(set(refs)) != len(refs):
            raise UserError(f"the mergekit config lists a model twice for {where}: {refs}")
        if with_base and base_ref not in refs:
            raise UserError(f"the mergekit config does not merge base model {base_ref!r} into "
                            f"{where}; mergekit needs the base in every slice")
        if not with_base and base_ref in refs:
            raise UserError(f"base {base_ref!r} is an input of this merge at {where}; a recipe "
                            f"merges only its experts")
        others = [ref for ref in refs if ref != base_ref]
        if experts is None:
            experts = others
        elif set(others) != set(experts):
            raise UserError(f"the mergekit config merges {sorted(others)} at {where} but "
                            f"{sorted(experts)} before; a recipe merges the same experts "
                            f"everywhere")
    if not experts:
        raise UserError("the mergekit config merges no model besides the base")
    return experts


def _evaluate(setting: Any, tensor: str, t: float, convert: Callable[[Any, str], Any],
              where: str) -> Any:
    """One setting for one tensor at gradient position t, as mergekit evaluates it: the first
    filter contained in the tensor name wins (None when none does, so a lower scope decides);
    numeric gradients interpolate linearly between neighbouring entries, others pick one."""
    if isinstance(setting, Mapping) or (isinstance(setting, list) and setting
                                        and all(isinstance(c, Mapping) for c in setting)):
        for i, condition in enumerate([setting] if isinstance(setting, Mapping) else setting):
            checked_mapping(condition, f"{where} condition {i}", required=("value",),
                     optional=("filter",))
            mark = condition.get("filter")
            if mark is None or mark == "*" or (isinstance(mark, str) and mark in tensor):
                return _evaluate(condition["value"], tensor, t, convert, where)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [convert(v, where) for v in setting]
        if any(isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    return convert(setting, where)


def _settings(keys: Sequence[str], kinds: Mapping[str, MethodConfig], get: Callable[[MethodConfig, str], Any],
              marks: Mapping[str, Sequence[str]], in_block: str) -> dict[str, Any]:
    """mergekit settings for one slice: a scalar when every kind agrees, else a filter list
    (first match wins: attn, mlp, then other block tensors, then the tensors outside blocks)."""
    out: dict[str, Any] = {}
    for key in keys:
        values = {kind: get(config, key) for kind, config in kinds.items()}
        block, outside = values["all"], values["outside"]
        conditions = [{"filter": mark, "value": values[k]} for k in marks if values[k] != block for mark in marks[k]]
        if outside != block:
            conditions.append({"filter": in_block, "value": block})
        out[key] = conditions + [{"value": outside}] if conditions else outside
    return out


def check_mergekit_knows(layout: Layout) -> None:
    """Refuse an architecture the installed mergekit has no definition of (read off its package;
    without mergekit installed nobody can run the config, so nothing is checked)."""
    try:
        from mergekit.architecture.json_definitions import NAME_TO_ARCH
    except ImportError:
        return
    if layout.architecture not in NAME_TO_ARCH:
        raise UserError(f"mergekit has no architecture definition for {layout.architecture}, so it could not "
                        f"redo this merge; the merged model folder is the export")


def check_mergekit_reads(config: Any, tensor_names: set[str]) -> None:
    """Refuse a model whose tensors mergekit's definition of its architecture does not match:
    mergekit 0.1.5's GPT-NeoX definition requires ``attention.masked_bias``, which transformers no
    longer saves, so its run would stop at the first block."""
    try:
        from mergekit.architecture import arch_info_for_config
    except ImportError:
        return
    arch = arch_info_for_config(config)
    if arch is None:
        return  # check_mergekit_knows names the architecture
    for weight in arch.all_weights(config):
        names = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
        if not weight.optional and not any(name in tensor_names for name in names):
            raise UserError(f"mergekit's definition of {config.architectures[0]} requires {weight.name!r}, which this "
                            f"model does not have, so mergekit could not redo this merge; the merged model folder is the export")


def _params(data: Any, where: str) -> Mapping[str, Any]:
    """Parameters of one scope: any parameter some registered method takes (a method ignores the
    others, as mergekit does), plus those mergekit reads and no merge here needs."""
    known = [*registry.known_params("expert"), *registry.known_params("global"), *_IGNORED_PARAMS]
    return checked_mapping(data if data is not None else {}, where, optional=known)


def _list(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list) or not data:
        raise UserError(f"{where} must be a non-empty list, got {short_repr(data)}")
    return data


def _ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where} must be a model path or hub id, got {short_repr(value)}")
    return value
