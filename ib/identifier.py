"""Where the identifier token V̂ sits in a tokenized prompt, and its removal for CLIP-T."""
import re

import torch


def _pattern(identifier: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(identifier)}(?!\w)", re.IGNORECASE)


def contains_identifier(prompt: str, identifier: str) -> bool:
    return _pattern(identifier).search(prompt) is not None


def replace_identifier(prompt: str, identifier: str, text: str) -> str:
    """'a photo of a sks dog' -> 'a photo of a {text} dog', whitespace normalised."""
    return " ".join(_pattern(identifier).sub(text, prompt).split())


def strip_identifier(prompt: str, identifier: str) -> str:
    """'a photo of a sks dog' -> 'a photo of a dog' (the CLIP-T protocol)."""
    return replace_identifier(prompt, identifier, " ")


def insert_identifier(caption: str, class_noun: str, identifier: str) -> str | None:
    """Put V̂ just before the first whole-word mention of the class noun; None if it is not there."""
    m = re.search(rf"(?<!\w){re.escape(class_noun)}(?!\w)", caption, re.IGNORECASE)
    if m is None:
        return None
    return f"{caption[:m.start()]}{identifier} {caption[m.start():]}"


def tokenize_with_identifier(tokenizer, prompts: list[str], identifier: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and a bool mask (B, L) of every token that belongs to the identifier word.

    Uses the tokenizer's character offsets, so a multi-token identifier is covered at every position
    and a word that merely contains the identifier is not.
    """
    enc = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_offsets_mapping=True, return_tensors="pt",
    )
    offsets = enc["offset_mapping"]  # (B, L, 2); specials and padding are (0, 0)
    mask = torch.zeros(enc["input_ids"].shape, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        for m in _pattern(identifier).finditer(prompt):
            start, end = offsets[b, :, 0], offsets[b, :, 1]
            mask[b] |= (start >= m.start()) & (end <= m.end()) & (end > start)
    return enc["input_ids"], mask
