"""The toy base's vocabulary cut to the synthetic world's words: a smaller stored base, the same model on them.

The toy base's text encoder is random and frozen, and its UNet only ever read the world's captions, so of CLIP's
49,408 tokens only a few dozen mean anything to it; the others cost 3.2 MB of embedding rows and 3.6 MB of
tokenizer file. `prune_vocabulary` keeps the 512 byte symbols (any text still tokenizes), the specials and the
merges that the given texts use, with their embedding rows: on those texts the token strings and the text
states are exactly what the full vocabulary gives. A word outside it is split into smaller pieces, which are
random rows to this base either way. The toy base trainer cuts its base when it saves it.
"""
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTokenizer

from data_tools.synthetic_world import COLOURS, CONTEXTS, SHAPES, TEMPLATES, TEXTURE_WORDS
from ib.models.frozen_ldm import FrozenLDM

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
WORLD_TEXTS = "the synthetic world's captions, with and without the identifier, and its words for looks"  # what record.json says was kept


def world_texts(identifier: str) -> list[str]:
    """Every caption the synthetic world writes, each also with the identifier before the noun (as InstantBooth
    prompts hold it), and the words the toy base's look descriptions use (data_tools.synthetic_world.describe)."""
    looks = " and ".join([*COLOURS, *filter(None, TEXTURE_WORDS.values())])
    return [t.format(noun=noun, context=c) for t in TEMPLATES for n in SHAPES for noun in (n, f"{identifier} {n}")
            for c in CONTEXTS] + [looks]


def _tokens(tokenizer, texts: list[str]) -> list[list[str]]:
    return [tokenizer.convert_ids_to_tokens(tokenizer(t).input_ids) for t in texts]


def prune_vocabulary(ldm: FrozenLDM, texts: list[str]) -> int:
    """Cuts ldm's tokenizer and text-encoder embedding to what `texts` use (see the module doc); returns the new
    vocabulary size. Raises if the cut tokenizer would split any of `texts` differently."""
    if ldm.text_encoder_2 is not None:
        raise ValueError("one-encoder bases only (the toy base)")
    tok, encoder = ldm.tokenizer, ldm.text_encoder
    vocab = tok.get_vocab()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    made_by = {"".join(m.split()): m for m in merges}  # each merged token comes from one merge
    needed, todo = set(), [t for ts in _tokens(tok, texts) for t in ts]
    while todo:  # every merge on the way to a used token
        t = todo.pop()
        if t in made_by and t not in needed:
            needed.add(t)
            todo += made_by[t].split()
    symbols = sorted((t for t, i in vocab.items() if i < 512), key=vocab.get)
    kept_merges = [m for m in merges if "".join(m.split()) in needed]  # rank order kept: BPE merges the same way
    new_vocab = symbols + ["".join(m.split()) for m in kept_merges] + list(SPECIALS)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(new_vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept_merges) + "\n")
        new_tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=tok.model_max_length,
                                                pad_token=tok.pad_token, unk_token=tok.unk_token)
    if _tokens(new_tok, texts) != _tokens(tok, texts):
        raise RuntimeError("the cut vocabulary splits the texts differently")
    old_ids = torch.tensor([vocab[t] for t in new_vocab])
    weight = encoder.get_input_embeddings().weight.detach()[old_ids].clone()
    encoder.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
    new_id = {old: new for new, old in enumerate(old_ids.tolist())}
    c = encoder.config
    c.vocab_size = len(new_vocab)
    c.bos_token_id, c.eos_token_id = new_id[c.bos_token_id], new_id[c.eos_token_id]
    c.pad_token_id = new_id.get(c.pad_token_id, c.pad_token_id)
    ldm.tokenizer = new_tok
    return len(new_vocab)
