"""SearchSpace: genes, decode/encode round trips, bounds, and the algorithms built on it."""

import random

import numpy as np
import pytest

from evomerge.config import AlgorithmConfig, SpaceConfig, parse
from evomerge.errors import UserError
from evomerge.mergekit_config import to_mergekit_yaml
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.search.algorithms import make_algorithm, make_problem
from evomerge.search.space import SearchSpace

EXPERTS = ("a", "b", "c")


def space(**kw) -> SearchSpace:
    # One layer per group, no depth profiles, task arithmetic and no known recipes unless a test says otherwise
    # (the numbers below count on it), whatever the search's defaults are.
    return SearchSpace(parse(SpaceConfig, {"granularity": 1, "knots": 0, "initial": [], "methods": ["task_arithmetic"],
                                           **kw}), "base", EXPERTS, 30)


def test_gene_count_follows_granularity_components_and_methods():
    assert len(space(granularity=5).names) == (6 + 1) * 3  # 6 layer groups + outside, a weight each
    assert len(space(granularity=0).names) == 2 * 3
    assert len(space(granularity=10, split_components=True).names) == (2 * 3 + 1) * 3
    mixed = space(granularity=10, methods=["task_arithmetic", "ties"])
    assert mixed.mixed and len(mixed.names) == 4 * (1 + 3 * 2)  # method gene + weight & density


def test_decode_places_each_group_and_encode_inverts_it():
    s = space(granularity=7, methods=["task_arithmetic", "ties"])
    genome = s.random(random.Random(0))
    recipe = s.decode(genome)
    assert [(g.start, g.end) for g in recipe.groups] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]
    group = recipe.groups[2]
    assert group.config.method == genome["L14-20.method"]
    assert group.config.experts["b"].weight == pytest.approx(genome["L14-20.b.weight"])
    back = s.encode(recipe)
    # densities a method ignores are pinned to 1.0 (clipped to the bound), everything else round-trips
    for name, value in genome.items():
        method = genome[name.split(".")[0] + ".method"]
        if name.endswith(".density") and method == "task_arithmetic":
            assert back[name] == 1.0
        elif isinstance(value, float):
            assert back[name] == pytest.approx(value)
        else:
            assert back[name] == value


def test_ignored_genes_do_not_change_the_recipe_hash():
    s = space(granularity=0, methods=["task_arithmetic", "ties"])
    genome = s.random(random.Random(1))
    genome = {k: ("task_arithmetic" if k.endswith(".method") else v) for k, v in genome.items()}
    other = {k: (0.77 if k.endswith(".density") else v) for k, v in genome.items()}
    assert s.decode(genome).hash == s.decode(other).hash


def test_split_components_gives_attention_its_own_genes():
    s = space(granularity=30, split_components=True)
    genome = {n: 0.1 for n in s.names}
    genome["L0-29.attn.a.weight"] = 0.9
    recipe = s.decode(genome)
    assert recipe.config_for(3, "attn").experts["a"].weight == pytest.approx(0.9)
    assert recipe.config_for(3, "mlp").experts["a"].weight == pytest.approx(0.1)
    assert recipe.config_for(3, "norm").experts["a"].weight == pytest.approx(0.1)


def test_vector_and_dict_genomes_decode_alike():
    s = space(granularity=10)
    genome = s.random(random.Random(2))
    assert s.decode(s.vector(genome)).hash == s.decode(genome).hash


def test_initial_recipes_from_mappings_and_mergekit(tmp_path):
    s = space(granularity=10, methods=["task_arithmetic", "ties"],
              initial=[{"method": "ties", "weight": 0.4, "density": 0.6}])
    (recipe,) = s.initial_recipes()
    genome = s.encode(recipe)
    assert genome["L10-19.method"] == "ties" and genome["L10-19.c.density"] == pytest.approx(0.6)
    config = MethodConfig("task_arithmetic", {e: ExpertParams(weight=0.25) for e in EXPERTS})
    path = tmp_path / "mk.yaml"
    path.write_text(to_mergekit_yaml(Recipe.uniform("base", EXPERTS, 30, config)))
    read = space(granularity=10, initial=[str(path)]).initial_recipes()[0]
    assert read.config_for(12, "mlp").experts["b"].weight == pytest.approx(0.25)


@pytest.mark.reliability("bad input", "search-space settings: inverted gene bounds, density outside [0, 1], unknown or unweightable method, unknown key")
@pytest.mark.parametrize("settings, message", [
    ({"granularity": -1}, "granularity=-1"),
    ({"methods": ["nope"]}, "'nope'"),
    ({"methods": ["slerp"]}, "'slerp'"),
    ({"weight": [1.0, 0.0]}, "inverted"),
    ({"density": [0.0, 1.5]}, "valid range"),
    ({"colour": 1}, "'colour'"),
    ({"initial": [{"method": "ties"}]}, "not in space.methods"),
    ({"knots": 1}, "knots=1"),
    ({"knots": -2}, "knots=-2"),
    ({"knots": 3, "split_components": True}, "cannot be combined"),
])
def test_bad_space_settings_fail_in_one_line(settings, message):
    with pytest.raises(UserError, match=message) as error:
        space(**settings).initial_recipes()
    assert "\n" not in str(error.value)


@pytest.mark.reliability("bad input", "a space.initial recipe file that is malformed YAML or not a recipe")
@pytest.mark.parametrize("text, message", [
    ("method: ties\n  weight: [0.3\n", "malformed .* YAML at line 2"),
    ("", "recipe must be a mapping, got None"),
    ("merge_method: ties\nbase_model: b\nmodels: 3\n", "models must be a non-empty list"),
])
def test_a_bad_initial_recipe_file_fails_in_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "seed.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        space(initial=[str(path)]).initial_recipes()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["ga", "de", "cmaes", "nsga2", "nsga3", "smsemoa", "agemoea", "moead"])
def test_every_algorithm_runs_ask_tell_on_the_space(name):
    s = space(granularity=15)
    n_obj = 1 if name in ("ga", "de", "cmaes") else 2
    config = AlgorithmConfig(name=name, pop_size=6, generations=3)
    algorithm = make_algorithm(config, s, n_obj)
    algorithm.setup(make_problem(s, n_obj), termination=("n_gen", 3), seed=0)
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.individual import Individual
    from pymoo.core.population import Population
    from pymoo.problems.static import StaticProblem

    asked_points = 0
    while algorithm.has_next():
        asked = algorithm.ask()
        pop = Population.create(asked) if isinstance(asked, Individual) else asked
        recipes = [s.decode(x) for x in pop.get("X")]
        weights = [r.config_for(layer, "mlp").experts[e].weight for r in recipes for layer in range(4) for e in "ab"]
        assert all(0.0 <= w <= 1.0 for w in weights), name  # every asked point decodes inside the space
        asked_points += len(recipes)
        # objective: distance of expert a's mean weight from 0.7 (and b's weight, for a second one)
        F = np.array([[abs(r.config_for(0, "mlp").experts["a"].weight - 0.7),
                       r.config_for(0, "mlp").experts["b"].weight][:n_obj] for r in recipes])
        Evaluator().eval(StaticProblem(algorithm.problem, F=F), pop)
        algorithm.tell(infills=asked)
    # three generations of six told back (CMA-ES and MOEA/D ask in their own portions)
    assert algorithm.n_gen >= 3 and asked_points >= 2 * 6, (name, algorithm.n_gen, asked_points)
    assert len(algorithm.opt) >= 1 and np.isfinite(algorithm.opt.get("F")).all()


def test_mixed_space_with_a_vector_only_algorithm_is_refused():
    s = space(methods=["task_arithmetic", "ties"])
    with pytest.raises(UserError, match="categorical method gene"):
        make_algorithm(AlgorithmConfig(name="cmaes"), s, 1)


def test_initial_genomes_open_the_first_population():
    s = space(granularity=15, methods=["task_arithmetic", "ties"], initial=[{"method": "ties", "weight": 0.9, "density": 0.3}])
    initial = [s.encode(r) for r in s.initial_recipes()]
    algorithm = make_algorithm(AlgorithmConfig(name="nsga2", pop_size=6), s, 2, initial)
    algorithm.setup(make_problem(s, 2), termination=("n_gen", 1), seed=0)
    first = s.as_genome(algorithm.ask().get("X")[0])
    assert first["L0-14.method"] == "ties" and first["L0-14.a.weight"] == pytest.approx(0.9)


@pytest.mark.reliability("bad input", "algorithm settings: unknown algorithm, population smaller than 2, no generations")
@pytest.mark.parametrize("settings, message", [
    ({"name": "pso"}, "'pso'"), ({"pop_size": 1}, "pop_size=1"), ({"generations": -1}, "generations=-1"),
])
def test_bad_algorithm_settings_fail_in_one_line(settings, message):
    with pytest.raises(UserError, match=message):
        parse(AlgorithmConfig, settings)


def test_single_objective_algorithm_with_several_objectives_is_refused():
    with pytest.raises(UserError, match="optimizes one objective"):
        AlgorithmConfig(name="ga").check_objectives(4)
    AlgorithmConfig(name="cmaes").check_objectives(4, averageable=True)  # told the tasks' mean


def test_knots_interpolate_each_gene_linearly_over_depth():
    """Genes at 3 knots (layers 0, 14, 29) of a 30-layer model: every layer's weight is the
    element-wise linear interpolation between its two nearest knots; the outside group keeps
    its own genes; and the genome round-trips through the recipe."""
    s = space(knots=3)
    assert s.names == [f"{k}.{e}.weight" for k in ("out", "k0", "k1", "k2") for e in EXPERTS]
    genome = s.random(random.Random(3))
    recipe = s.decode(genome)
    for layer in range(30):
        left = 0 if layer < 14 else 1
        t = layer / 14 if layer < 14 else (layer - 14) / 15
        for e in EXPERTS:
            want = (1 - t) * genome[f"k{left}.{e}.weight"] + t * genome[f"k{left + 1}.{e}.weight"]
            assert recipe.config_for(layer, "mlp").experts[e].weight == pytest.approx(want, abs=1e-12)
    assert recipe.outside.experts["b"].weight == genome["out.b.weight"]
    back = s.encode(recipe)
    assert back == pytest.approx(genome)


def test_more_knots_than_layers_is_a_knot_per_layer():
    assert space(knots=31).names == space(knots=30).names
    assert len(space(knots=31).names) == (1 + 30) * 3


def test_a_flat_knot_profile_is_the_uniform_recipe():
    s = space(knots=4)
    config = MethodConfig("task_arithmetic", {e: ExpertParams(weight=0.3) for e in EXPERTS})
    flat = Recipe.uniform("base", EXPERTS, 30, config)
    decoded = s.decode(s.encode(flat))
    assert decoded.hash == flat.hash and len(decoded.groups) == 1


def test_knots_choose_methods_from_the_nearest_knot():
    s = space(knots=2, methods=["task_arithmetic", "ties"])
    genome = {**s.random(random.Random(0)), "k0.method": "ties", "k1.method": "task_arithmetic"}
    recipe = s.decode(genome)
    assert [recipe.config_for(n, "mlp").method for n in (0, 14, 15, 29)] == \
        ["ties", "ties", "task_arithmetic", "task_arithmetic"]  # the knots sit at layers 0 and 29


@pytest.mark.parametrize("methods, n_obj", [(["task_arithmetic"], 1), (["task_arithmetic", "ties"], 3)])
def test_random_search_asks_fresh_genomes_each_generation_after_the_initial_ones(methods, n_obj):
    import pickle

    from pymoo.core.evaluator import Evaluator
    from pymoo.problems.static import StaticProblem

    s = space(granularity=15, methods=methods, initial=[{"method": methods[-1], "weight": 0.9, "density": 0.3}])
    initial = [s.encode(r) for r in s.initial_recipes()]

    def asked(cut: bool) -> list[list[dict]]:
        algorithm = make_algorithm(AlgorithmConfig(name="random", pop_size=5, generations=3), s, n_obj, initial)
        algorithm.setup(make_problem(s, n_obj), termination=("n_gen", 3), seed=0)
        generations = []
        while algorithm.has_next():
            pop = algorithm.ask()
            generations.append([s.as_genome(x) for x in pop.get("X")])
            Evaluator().eval(StaticProblem(algorithm.problem, F=np.zeros((len(pop), n_obj))), pop)
            algorithm.tell(infills=pop)
            if cut:  # a checkpoint round trip changes nothing about what comes next
                algorithm = pickle.loads(pickle.dumps(algorithm))
        return generations

    generations = asked(cut=False)
    assert [len(g) for g in generations] == [5, 5, 5]
    assert generations[0][0]["L0-14.a.weight"] == pytest.approx(0.9)  # the known recipe opens
    assert len({repr(sorted(g.items())) for gen in generations for g in gen}) == 15  # all fresh
    assert asked(cut=True) == generations


def test_random_search_is_a_known_algorithm_for_any_objective_count():
    config = parse(AlgorithmConfig, {"name": "random"})
    config.check_objectives(1)
    config.check_objectives(4)


@pytest.mark.parametrize("name", ["ga", "de", "cmaes", "nsga2", "random"])
def test_initial_genomes_seed_algorithms_on_a_real_valued_space(name):
    # A real-valued space with known recipes hands only a seeded sampling to the algorithm; GA
    # once took that for a mixed-variable space and failed on its first ask.
    s = space(granularity=15, initial=[{"method": "task_arithmetic", "weight": 0.4}])
    initial = [s.encode(r) for r in s.initial_recipes()]
    n_obj = 2 if name in ("nsga2", "random") else 1
    algorithm = make_algorithm(AlgorithmConfig(name=name, pop_size=4, generations=2), s, n_obj, initial)
    algorithm.setup(make_problem(s, n_obj), termination=("n_gen", 2), seed=0)
    from pymoo.core.evaluator import Evaluator
    from pymoo.problems.static import StaticProblem

    first = None
    while algorithm.has_next():
        pop = algorithm.ask()
        first = first if first is not None else s.as_genome(pop.get("X")[0])
        Evaluator().eval(StaticProblem(algorithm.problem, F=np.random.default_rng(0).random((len(pop), n_obj))), pop)
        algorithm.tell(infills=pop)
    assert first["L0-14.a.weight"] == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["ga", "de", "cmaes", "nsga2", "nsga3", "smsemoa", "agemoea", "random", "moead"])
def test_every_algorithm_replays_alike_from_its_seed(name):
    """What resume relies on instead of saved state: set up afresh from the run's seed, in a
    process whose global random states are anything, an algorithm told the same results asks
    the same candidates."""
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.individual import Individual
    from pymoo.core.population import Population
    from pymoo.problems.static import StaticProblem

    from evomerge.search.algorithms import setup

    s = space(granularity=15)
    n_obj = 1 if name in ("ga", "de", "cmaes") else 2

    def asked(global_seed: int) -> list:
        np.random.seed(global_seed)  # a fresh process's global states differ from run to run
        random.seed(global_seed)
        algorithm = make_algorithm(AlgorithmConfig(name=name, pop_size=6, generations=4), s, n_obj,
                                   [s.random(random.Random(0))] if name == "cmaes" else None)
        setup(algorithm, make_problem(s, n_obj), 4, seed=0)
        seen = []
        while algorithm.has_next():
            got = algorithm.ask()
            pop = Population.create(got) if isinstance(got, Individual) else got
            X = np.array([s.vector(s.as_genome(x)) for x in pop.get("X")])
            seen.append(X.round(9).tolist())
            F = np.stack([np.abs(X[:, 0] - 0.7), X[:, 1]], axis=1)[:, :n_obj]
            Evaluator().eval(StaticProblem(algorithm.problem, F=F), pop)
            algorithm.tell(infills=got)
        return seen

    first = asked(123)
    assert len(first) >= 4  # (MOEA/D asks one at a time after its first population)
    assert asked(999) == first


def test_uniform_parents_and_default_initial_recipes_use_the_spaces_first_method():
    from evomerge.search.settings import search_fingerprint

    tsv = SearchSpace(parse(SpaceConfig, {"methods": ["tsv_m"]}), "base", EXPERTS, 30)
    parents = tsv.parent_recipes()
    assert parents["uniform:1"].outside.method == "tsv_m"
    assert {e: c.weight for e, c in parents["uniform:0.5"].outside.experts.items()} == dict.fromkeys(EXPERTS, 0.5)
    # the input models themselves stay the experts (task arithmetic with a one-hot weight)
    assert parents[f"expert:{EXPERTS[0]}"].outside.method == "task_arithmetic"
    assert [r.outside.method for r in tsv.initial_recipes()] == ["tsv_m", "tsv_m"]
    assert tsv.encode(parents["uniform:1"])  # a start the space can spell
    spelled = {"space": {"methods": ["task_arithmetic"], "initial": [{"method": "task_arithmetic", "weight": 0.3}]}}
    implied = {"space": {"methods": ["task_arithmetic"], "initial": [{"weight": 0.3}]}}
    assert search_fingerprint(spelled) == search_fingerprint(implied)
    assert search_fingerprint(implied) != search_fingerprint({"space": {"methods": ["tsv_m"], "initial": [{"weight": 0.3}]}})
