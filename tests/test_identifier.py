"""The concept embedding replaces the identifier's text-encoder outputs, exactly there and nowhere else."""
import pytest
import torch

from ib.identifier import insert_identifier, strip_identifier, tokenize_with_identifier
from tests.conftest import build_tiny_model


@pytest.mark.parametrize("identifier", ["sks", "zzxq"])  # one BPE token; several (the toy base's cut vocabulary: 4)
def test_concept_lands_at_identifier_positions_only(identifier):
    model = build_tiny_model(identifier=identifier)
    tok = model.ldm.tokenizer
    n_id_tokens = len(tok(identifier, add_special_tokens=False).input_ids)
    assert (n_id_tokens == 1) == (identifier == "sks") and n_id_tokens >= 1

    prompts = [f"a photo of a {identifier} dog on the beach", f"{identifier} cat and my {identifier} cat",
               "a photo of a dog"]
    ids, where = tokenize_with_identifier(tok, prompts, identifier)
    assert where.sum(1).tolist() == [n_id_tokens, 2 * n_id_tokens, 0]

    concept = torch.randn(3, model.ldm.text_width)
    plain = model.encode_prompts(prompts)
    injected = model.encode_prompts(prompts, concept, alpha=0.4)
    changed = (plain != injected).any(-1)
    assert torch.equal(changed, where)
    for b in range(3):
        for pos in where[b].nonzero().flatten():
            torch.testing.assert_close(injected[b, pos], 0.4 * concept[b])


def test_identifier_inside_another_word_is_not_matched():
    model = build_tiny_model()
    _, where = tokenize_with_identifier(model.ldm.tokenizer, ["a photo of sksdog and tasks"], "sks")
    assert not where.any()


def test_caption_helpers():
    assert insert_identifier("a photo of a dog on the beach", "dog", "sks") == "a photo of a sks dog on the beach"
    assert insert_identifier("Dogs and a Dog", "dog", "sks") == "Dogs and a sks Dog"
    assert insert_identifier("a cat", "dog", "sks") is None
    assert strip_identifier("a photo of a sks dog on the beach", "sks") == "a photo of a dog on the beach"
