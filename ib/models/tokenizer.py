"""A real CLIP BPE tokenizer built offline from the vocabulary that ships inside open_clip."""
import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import open_clip
from transformers import CLIPTokenizer

# CLIP's vocabulary: 256 byte symbols, the same with </w>, one entry per merge, then two specials.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def offline_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The tokenizer of Stable Diffusion 1.x (openai CLIP BPE), with no download; pad_token "!": SDXL's second."""
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length, pad_token=pad_token)
