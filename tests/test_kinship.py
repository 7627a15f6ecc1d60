"""Kinship of a pool: per-layer task-vector norms and cosine similarities, checked against torch
computed directly on whole flattened task vectors of the pico zoo."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.errors import UserError
from evomerge.kinship import OUTSIDE, kinship, pool_for, render
from evomerge.pool import ModelPool

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pool(pico_zoo):
    return ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()})


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def test_norms_and_cosines_match_torch(pool):
    result = kinship(pool)
    assert result.experts == pool.expert_names
    assert result.layers == ["0", "1", "2", "3", OUTSIDE]
    for expert, tau in pool.task_vectors.items():
        for layer in result.layers:
            part = [t for name, t in tau.items()
                    if str(pool.layout.layer_of(name)) == layer or (layer == OUTSIDE and pool.layout.layer_of(name) is None)]
            assert result.norms[expert][layer] == pytest.approx(float(flat(part).norm()), rel=1e-9)
        assert result.total[expert] == pytest.approx(float(flat(tau.values()).norm()), rel=1e-9)
        assert result.relative[expert] == pytest.approx(
            float(flat(tau.values()).norm() / flat(pool.base.values()).norm()), rel=1e-9)
    vectors = [flat(pool.task_vectors[e].values()) for e in result.experts]
    for i, a in enumerate(vectors):
        assert result.cosine[i][i] == pytest.approx(1.0, abs=1e-12)
        for j, b in enumerate(vectors):
            assert result.cosine[i][j] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
    text = render(result)
    assert "kinship" in text and "outside" in text and "+1.000" in text


def test_the_same_expert_under_two_names_has_kinship_one(pico_zoo):
    twin = kinship(ModelPool(str(pico_zoo.base), {"a": str(pico_zoo.expert("add")),
                                                  "b": str(pico_zoo.expert("add"))}))
    assert twin.cosine[0][1] == pytest.approx(1.0, abs=1e-12)


def test_pool_arguments_are_models_or_zoo_overrides(pico_zoo, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="at least one expert"):
        pool_for([str(pico_zoo.base)])
    with pytest.raises(UserError, match="not both"):
        pool_for([str(pico_zoo.base), "zoo=pico"])
    named = pool_for([f"models.base={pico_zoo.base}",
                      f"models.experts=[{pico_zoo.expert('add')},{pico_zoo.expert('sort')}]"])
    assert named.expert_names == ["add", "sort"]
    with pytest.raises(UserError, match="models.experts is empty"):
        pool_for([f"models.base={pico_zoo.base}"])
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))  # an empty cache: no zoo built there
    with pytest.raises(UserError, match="evomerge zoo build zoo=pico"):
        pool_for(["zoo=pico"])


def test_pool_command(pico_zoo, pico_cache, evomerge_main):
    cli = lambda *args, cache: evomerge_main("pool", *args, cache=cache)  # noqa: E731
    done = cli("zoo=pico", "--json", cache=pico_cache)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["experts"] == list(pico_zoo.config.skills) and len(data["cosine"]) == 4
    by_path = cli(str(pico_zoo.base), str(pico_zoo.expert("add")), str(pico_zoo.expert("sort")),
                  cache=pico_cache)
    assert by_path.returncode == 0, by_path.stderr
    assert "task-vector L2 norm per layer" in by_path.stdout and "sort" in by_path.stdout
    bad = cli(str(pico_zoo.base), cache=pico_cache)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_subspace_overlap_matches_a_per_matrix_loop(pool):
    result = kinship(pool)
    experts = result.experts
    count = len(experts)
    want = [[0.0] * count for _ in range(count)]
    matrices = 0
    for name, base in pool.base.items():
        if base.ndim != 2 or pool.layout.layer_of(name) is None:
            continue
        k = max(1, min(base.shape) // count)
        tops = [torch.linalg.svd(pool.task_vectors[e][name].double(), full_matrices=False)[0][:, :k] for e in experts]
        for i in range(count):
            for j in range(count):
                want[i][j] += float((tops[i].T @ tops[j]).square().sum()) / k
        matrices += 1
    assert matrices > 0
    for i in range(count):
        assert result.overlap[i][i] == pytest.approx(1.0, abs=1e-4)
        for j in range(count):
            assert result.overlap[i][j] == pytest.approx(want[i][j] / matrices, abs=1e-4)
    assert 0 < result.overlap_chance < 1
    assert "subspace overlap" in render(result)
