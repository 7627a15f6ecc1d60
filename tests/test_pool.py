import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import UserError
from evomerge.architecture import llama_layout
from evomerge.pool import ModelPool, load_model


@pytest.fixture
def variant(pico_zoo, tmp_path):
    """A copy of the pico base folder, to be broken in one way by the test."""
    def make(name="variant"):
        folder = tmp_path / name
        shutil.copytree(pico_zoo.base, folder)
        return folder
    return make


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _pool_error(pico_zoo, expert) -> str:
    with pytest.raises(UserError) as caught:
        ModelPool(str(pico_zoo.base), {"bad": str(expert)})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_task_vectors_are_expert_minus_base(pico_zoo):
    pool = ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()})
    assert pool.expert_names == list(pico_zoo.config.skills)
    expert, _ = load_model(str(pico_zoo.expert("add")))
    weights = dict(expert.named_parameters())
    for name, base in pool.base.items():
        torch.testing.assert_close(base + pool.task_vectors["add"][name], weights[name].detach())
    # Tied embeddings are held once: the head is the embedding, not a second tensor to merge.
    assert "lm_head.weight" not in pool.base and "model.embed_tokens.weight" in pool.base
    norms = pool.relative_norms()
    assert set(norms) == set(pico_zoo.config.skills) and all(0 < v < 1 for v in norms.values())


def test_layer_of():
    layout = llama_layout(30)
    assert layout.layer_of("model.layers.12.self_attn.q_proj.weight") == 12
    assert layout.layer_of("model.layers.0.mlp.up_proj.weight") == 0
    assert layout.layer_of("model.embed_tokens.weight") is None
    assert layout.layer_of("model.norm.weight") is None


@pytest.mark.reliability("bad input", "an expert of another architecture than the base")
def test_architecture_mismatch_is_named(pico_zoo, variant):
    folder = variant()
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert "MistralForCausalLM" in _pool_error(pico_zoo, folder)


@pytest.mark.reliability("bad input", "an expert missing a tensor the base has")
def test_missing_tensor_is_named(pico_zoo, variant):
    folder = variant()
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "model.layers.1.mlp.up_proj.weight" in _pool_error(pico_zoo, folder)


@pytest.mark.reliability("bad input", "an expert with a tensor of another shape")
def test_shape_mismatch_is_named(pico_zoo, variant):
    folder = variant()
    def widen(tensors):
        tensors["model.layers.2.mlp.down_proj.weight"] = torch.zeros(64, 256)
    _rewrite_weights(folder, widen)
    message = _pool_error(pico_zoo, folder)
    assert "model.layers.2.mlp.down_proj.weight" in message and "[64, 256]" in message and "[64, 128]" in message


@pytest.mark.reliability("bad input", "an expert with another tokenizer vocabulary")
def test_vocabulary_mismatch_is_named(pico_zoo, variant):
    from transformers import AutoTokenizer

    folder = variant()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    message = _pool_error(pico_zoo, folder)
    assert "vocabulary" in message and "<extra>" in message


@pytest.mark.reliability("bad input", "a model path that does not exist")
def test_missing_path_is_named(pico_zoo, tmp_path):
    message = _pool_error(pico_zoo, tmp_path / "no-such-model")
    assert "no-such-model" in message and "not found" in message


@pytest.mark.reliability("bad input", "a hub id while the hub is unreachable")
def test_unreachable_hub_id_is_named(pico_zoo):
    message = _pool_error(pico_zoo, "evomerge-test/does-not-exist")
    assert "evomerge-test/does-not-exist" in message and "local model folder" in message


@pytest.mark.reliability("safety", "pickle (pytorch_model.bin) weights refused unless allow_pickle is set")
def test_pickle_weights_refused_unless_opted_in(pico_zoo, tmp_path):
    model, tokenizer = load_model(str(pico_zoo.expert("add")))
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the legacy pickle format
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    message = _pool_error(pico_zoo, folder)
    assert "pickle" in message and "allow_pickle" in message
    pool = ModelPool(str(pico_zoo.base), {"add": str(folder)}, allow_pickle=True)
    stored = ModelPool(str(pico_zoo.base), {"add": str(pico_zoo.expert("add"))})
    assert pool.relative_norms()["add"] == pytest.approx(stored.relative_norms()["add"], rel=1e-6)  # the same weights


def test_a_bfloat16_checkpoint_loads_as_stored_and_merges_as_in_float32(pico_zoo, tmp_path):
    """A pool loads each model in the dtype its files store (half the host RAM for bfloat16)
    and computes task vectors in float32: the merge equals that of the same files loaded in
    float32, bit for bit."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import Merger
    from evomerge.model_files import folder_header, stored_dtype
    from evomerge.recipe import ExpertParams, MethodConfig, Recipe

    refs = {}
    for name, source in {"base": pico_zoo.base, **{k: pico_zoo.expert(k) for k in ("add", "upper")}}.items():
        model = AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16)
        model.save_pretrained(tmp_path / name)
        for file in Path(source).iterdir():  # the tokenizer's files
            if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
                shutil.copy(file, tmp_path / name / file.name)
        refs[name] = str(tmp_path / name)
    assert stored_dtype(e["dtype"] for e in folder_header(tmp_path / "base").values()) == torch.bfloat16
    assert stored_dtype(e["dtype"] for e in folder_header(Path(pico_zoo.base)).values()) == torch.float32
    experts = {k: refs[k] for k in ("add", "upper")}
    as_stored = ModelPool(refs["base"], experts)
    in_float32 = ModelPool(refs["base"], experts, dtype=torch.float32)
    assert next(iter(as_stored.base.values())).dtype == torch.bfloat16
    assert all(d.dtype == torch.float32 for d in as_stored.task_vectors["add"].values())
    config = MethodConfig("ties", {k: ExpertParams(weight=0.6, density=0.5) for k in experts})
    recipe = Recipe.uniform(refs["base"], list(experts), 4, config)
    ours = {k: v.clone() for k, v in Merger(as_stored).materialize(recipe).state_dict().items()}
    theirs = Merger(in_float32).materialize(recipe).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
