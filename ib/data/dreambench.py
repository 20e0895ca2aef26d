"""The DreamBench layout (Ruiz et al., 2023): one folder of photos per subject and `prompts_and_classes.txt`.

The text file has a `subject_name,class` table and two Python-style prompt lists ("Object Prompts" and
"Live Subject Prompts") whose templates take {0} = the identifier and {1} = the class noun. Live subjects
(DreamBooth's cats and dogs) get the live list, every other subject the object list.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ib.data.images import ImageError, read_image
from ib.errors import ConfigError

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

@dataclass
class Subject:
    name: str
    class_noun: str
    live: bool
    images: list[Path] = field(default_factory=list)


@dataclass
class DreamBench:
    root: Path
    subjects: list[Subject]
    object_prompts: list[str]
    live_prompts: list[str]

    def templates(self, subject: Subject) -> list[str]:
        return self.live_prompts if subject.live else self.object_prompts

    def prompts(self, subject: Subject, identifier: str) -> list[str]:
        """The subject's prompts with {0} = identifier, {1} = class noun."""
        return [t.format(identifier, subject.class_noun) for t in self.templates(subject)]


def _section(text: str, title: str, field_name: str) -> str:
    m = re.search(rf"^\s*{re.escape(title)}\s*$", text, re.MULTILINE)
    if m is None:
        raise ConfigError(f"{field_name}: no '{title}' section")
    return text[m.end():]


def _prompt_list(text: str, title: str, field_name: str) -> list[str]:
    body = _section(text, title, field_name)
    end = body.find("]")
    prompts = re.findall(r"""['"](.*?\{0\}.*?)['"]""", body[:end if end >= 0 else len(body)])
    if not prompts:
        raise ConfigError(f"{field_name}: no prompts with {{0}} under '{title}'")
    return prompts


def parse_prompts_file(text: str, field_name: str) -> tuple[dict[str, str], list[str], list[str]]:
    """-> ({subject: class noun}, object prompt templates, live prompt templates)."""
    classes = {}
    table = _section(text, "subject_name,class", field_name)
    for line in table.splitlines():
        if not line.strip():
            if classes:
                break
            continue
        name, sep, noun = line.partition(",")
        if not sep:
            break
        classes[name.strip()] = noun.strip()
    if not classes:
        raise ConfigError(f"{field_name}: no subjects in the 'subject_name,class' table")
    return classes, _prompt_list(text, "Object Prompts", field_name), _prompt_list(text, "Live Subject Prompts", field_name)


def read_dreambench(root: str | Path, live_classes=LIVE_CLASSES, field_name: str = "--data") -> DreamBench:
    """Reads and checks the folder: every listed subject has a folder with at least one image."""
    root = Path(root)
    prompts_file = root / PROMPTS_FILE
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{field_name}: cannot read {prompts_file}: {reason}") from e
    classes, object_prompts, live_prompts = parse_prompts_file(text, f"{field_name} {prompts_file}")
    subjects = []
    for name, noun in classes.items():
        folder = root / name
        if not folder.is_dir():
            raise ConfigError(f"{field_name}: subject folder missing: {folder}")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConfigError(f"{field_name}: no images in {folder}")
        subjects.append(Subject(name, noun, noun in live_classes, images))
    return DreamBench(root, subjects, object_prompts, live_prompts)


def load_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, RGB."""
    try:
        return read_image(Path(path))
    except ImageError as e:
        raise ConfigError(f"--data: cannot read image {path}: {e}") from e


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)
