"""The class vocabulary: which nouns name which class, and finding them in a caption.

`--classes dog,cat` (a comma list) or `--classes classes.txt`, one class per line with optional synonyms:

    # class: synonyms...
    person: man, men, woman, women, people, girl, boy
    cat: kitten
    stuffed animal: plush toy, teddy bear

Every noun also matches its regular English plural (dog -> dogs, box -> boxes, puppy -> puppies); list
irregular plurals (men, people) as synonyms. Matching is whole-word and case-insensitive.
"""
import re
from dataclasses import dataclass
from pathlib import Path


class VocabularyError(ValueError):
    pass


def plural(noun: str) -> str:
    """Regular English plural of the last word: 'stuffed animal' -> 'stuffed animals'."""
    head, _, last = noun.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def read_classes(spec: str) -> dict[str, list[str]]:
    """`--classes`: a file of `class: synonym, ...` lines, or a comma list of class nouns -> class -> synonyms."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise VocabularyError(f"cannot read {path}: {e}") from e
    elif "/" in spec or spec.endswith((".txt", ".csv")):
        raise VocabularyError(f"file not found: {spec}")
    else:
        lines = spec.split(",")
    synonyms: dict[str, list[str]] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, rest = line.partition(":")
        name = " ".join(name.lower().split())
        if not name:
            raise VocabularyError(f"empty class name in line '{line}'")
        synonyms.setdefault(name, []).extend(w.strip() for w in rest.split(",") if w.strip())
    if not synonyms:
        raise VocabularyError(f"no classes in '{spec}'")
    return synonyms


@dataclass(frozen=True)
class Match:
    cls: str    # the canonical class ("dog")
    noun: str   # the words as written in the caption ("Puppies")


class ClassVocabulary:
    def __init__(self, synonyms: dict[str, list[str]]):
        if not synonyms:
            raise VocabularyError("no classes given")
        self.classes = sorted(synonyms)
        self._class_of: dict[str, str] = {}
        for cls, words in synonyms.items():  # the words as listed first: they win over derived plurals
            for word in (" ".join(w.lower().split()) for w in [cls, *words]):
                other = self._class_of.setdefault(word, cls)
                if other != cls:
                    raise VocabularyError(f"'{word}' names two classes: {other}, {cls}")
        for word, cls in list(self._class_of.items()):
            self._class_of.setdefault(plural(word), cls)
        # Longest first: "stuffed animal" wins over "animal" where both fit.
        alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(self._class_of, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def find(self, caption: str) -> list[Match]:
        """Every class noun in the caption, in order of appearance."""
        return [Match(self._class_of[" ".join(m.group(0).lower().split())], m.group(0))
                for m in self._pattern.finditer(caption)]
