"""Prompts are encoded as lm-eval encodes them, special tokens included: a tokenizer that adds a
BOS (Gemma's and Llama's do; the zoo's SmolLM2 adds none, which hid the difference) gets it in
the native scorer, teacher forcing and the refinement's losses alike. The reference is lm-eval's
own HF wrapper: its ``tok_encode`` on the same strings, and its scores on the same items."""

from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing

from evomerge.fitness.native import encode_context
from evomerge.fitness.tasks import TaskSuite
from evomerge.zoo.tasks import task_name


@pytest.fixture(scope="module")
def bos_model(pico_zoo):
    """The pico base with a tokenizer that prepends ``<s>``, as Llama's does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pico_zoo.base)
    assert tokenizer("add: 1+2 =").input_ids[0] != tokenizer.bos_token_id  # it adds none of its own
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    model = AutoModelForCausalLM.from_pretrained(pico_zoo.expert(pico_zoo.config.skills[0])).eval()
    return model, tokenizer, AutoTokenizer.from_pretrained(pico_zoo.base)


def test_a_prompt_is_encoded_as_lm_eval_encodes_it(bos_model):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = bos_model
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    bos = tokenizer.bos_token_id
    for text in ("add: 12+30 =", "reverse: abc ->", f"{tokenizer.bos_token}add: 1+2 =", " upper: xy"):
        ids = encode_context(tokenizer, text)
        assert ids == lm.tok_encode(text), text
        assert ids[0] == bos and ids[1] != bos, text  # one BOS, also where the text brings its own
        assert lm.tok_batch_encode([text])[0][0].tolist() == ids, text


def test_native_scores_equal_lm_evals_with_a_bos_adding_tokenizer(pico_zoo, bos_model):
    model, tokenizer, plain = bos_model
    names = [task_name(s) for s in pico_zoo.config.skills] + [task_name(pico_zoo.config.skills[0],
                                                                        multiple_choice=True)]
    selection = {name: list(range(12)) for name in names}
    native = TaskSuite(names, tokenizer, include_path=str(pico_zoo.task_dir)).run(model, "validation", selection)
    reference = TaskSuite(names, tokenizer, include_path=str(pico_zoo.task_dir), native=False).run(
        model, "validation", selection)
    for name in names:
        assert native[name].correct == reference[name].correct, name
        assert native[name].length == reference[name].length, name  # the same answers, token for token
    # Without the BOS the model answers otherwise (other lengths), so the agreement above is one
    # a scorer that dropped the BOS would fail.
    without = TaskSuite(names, plain, include_path=str(pico_zoo.task_dir)).run(model, "validation", selection)
    assert sum(a != b for n in names[:-1] for a, b in zip(without[n].length, native[n].length)) >= 3
