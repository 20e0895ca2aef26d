"""The synthetic world's held-out concepts in DreamBench layout, so that `ib evaluate` runs on the embedded
default: one folder of photos per concept and `prompts_and_classes.txt`, whose prompts put the concept in
the world's contexts.

    python -m data_tools.held_out_bench --shards data/synthetic/val --out data/held_out_bench

The photos are whole images, as in DreamBench; `ib evaluate --mask-backend grabcut` masks them as training's
references were. The folder appears only when complete.
"""
import argparse
import sys
from pathlib import Path

import webdataset as wds

from data_tools.synthetic_world import CONTEXTS
from ib.atomic_write import atomic_folder
from ib.data.dreambench import PROMPTS_FILE
from ib.data.shards import BadSample, decode_sample, resolve_shards
from ib.errors import ConfigError

CONTEXT_PROMPTS = [f"a photo of a {{0}} {{1}} {context}" for context in CONTEXTS]


def prompts_file(classes: dict[str, str]) -> str:
    """DreamBench's file: the subject,class table, then the prompt lists ({0}: identifier, {1}: class noun)."""
    table = "\n".join(f"{name},{noun}" for name, noun in classes.items())
    prompts = ",\n".join(f"'{p}'.format(unique_token, class_token)" for p in CONTEXT_PROMPTS)
    lists = "".join(f"{title}\n\nprompt_list = [\n{prompts}\n]\n\n" for title in ("Object Prompts", "Live Subject Prompts"))
    return f"Classes\n\nsubject_name,class\n{table}\n\nPrompts\n\n{lists}"


def build(shards: str, out: Path, photos: int) -> int:
    """-> the number of concepts written (each with up to `photos` photos, in the shards' order)."""
    concepts: dict[str, list[tuple[str, bytes]]] = {}
    classes: dict[str, str] = {}
    bad = 0
    for sample in wds.WebDataset(resolve_shards(shards, "--shards"), shardshuffle=False, empty_check=False,
                                 handler=wds.warn_and_continue):
        try:
            meta = decode_sample(sample)["meta"]
            name, noun = str(meta["concept"]), meta["class"]
        except (BadSample, KeyError):  # skipped and counted, as in training
            bad += 1
            continue
        classes[name] = noun
        concepts.setdefault(name, [])
        if len(concepts[name]) < photos:
            concepts[name].append((sample["__key__"], sample["jpg"]))
    if bad:
        print(f"{bad} unusable samples skipped", file=sys.stderr)
    if not concepts:
        raise ConfigError(f"--shards: {shards}: no usable samples")
    with atomic_folder(out) as tmp:
        (tmp / PROMPTS_FILE).write_text(prompts_file(classes))
        for name, items in concepts.items():
            (tmp / name).mkdir()
            for key, jpg in items:
                (tmp / name / f"{key}.jpg").write_bytes(jpg)
    return len(concepts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="the world's held-out shards (e.g. data/synthetic/val)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--photos", type=int, default=4, help="photos per concept (DreamBench has 4 to 6)")
    a = p.parse_args(argv)
    if a.photos < 1:
        p.error("--photos must be >= 1")
    try:
        print(f"wrote {build(a.shards, a.out, a.photos)} concepts to {a.out}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
