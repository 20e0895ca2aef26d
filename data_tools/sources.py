"""Inputs of the shard builder, each cut into jobs: one job = one output shard.

- a folder of images (searched recursively): a caption in `NAME.txt` beside `NAME.jpg`, an optional mask
  in `NAME.mask.png`;
- a manifest, `.csv` (with a header) or `.jsonl`: an image path (relative to the manifest's folder), a
  caption and optionally a mask path per row; the column names are flags;
- img2dataset output: WebDataset shards with `jpg` (or png/webp), `txt`, `json` and, when there are masks,
  `mask.png`; a folder of .tar files, a glob, a brace pattern or one .tar. Output shard i is input shard i.

Items carry paths (read by the worker that processes them) or bytes (read from the input shard here).
"""
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ib.data.shards import count_samples, read_tar_samples, resolve_shards
from ib.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"


class InputError(ValueError):
    """Bad input from the user; the message names the flag and the file."""


@dataclass
class Item:
    key: str
    image: str | bytes                # a path, or the encoded bytes
    caption: str | None               # None: read from caption_file, if any
    mask: str | bytes | None = None   # a path, the encoded bytes, or none provided
    caption_file: str | None = None   # read by the worker, not by the process that lists the folder
    source: str = ""                  # where it came from (path or URL), kept in the sample's json
    meta: dict = field(default_factory=dict)


@dataclass
class Job:
    name: str                           # output shard file name
    count: int                          # input samples (for the progress bar)
    items: Callable[[], Iterator[Item]]


@dataclass
class Columns:
    image: str = "image"
    caption: str = "caption"
    mask: str = "mask"


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (they start the extension), no slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def _unique_keys(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        key = safe_key(name)
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}_{n}")
    return keys


def _chunked(items: list[Item], size: int) -> list[Job]:
    return [Job(f"shard-{i // size:06d}.tar", len(items[i:i + size]), (lambda c=items[i:i + size]: iter(c)))
            for i in range(0, len(items), size)]


def folder_items(root: Path) -> list[Item]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not p.name.lower().endswith(MASK_SUFFIX) and not p.name.startswith("."))
    rel = [str(p.relative_to(root).with_suffix("")) for p in images]
    items = []
    for path, key, name in zip(images, _unique_keys(rel), rel):
        mask = path.with_name(path.stem + MASK_SUFFIX)
        items.append(Item(key, str(path), None, str(mask) if mask.is_file() else None, source=name,
                          caption_file=str(path.with_suffix(".txt"))))
    return items


def manifest_items(path: Path, columns: Columns) -> list[Item]:
    def bad(reason: str) -> InputError:
        return InputError(f"--input: cannot read manifest {path}: {reason}")

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise bad(str(e)) from e
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(text.splitlines())
            header = reader.fieldnames or []
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise bad(str(e)) from e
    else:
        rows, header = [], None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"line {n}: {e}") from e
            if not isinstance(row, dict):
                raise bad(f"line {n}: not a JSON object")
            header = list(row) if header is None else header
            rows.append((n, row))
        header = header or []
    for column in (columns.image, columns.caption):
        if column not in header:
            raise InputError(f"--input: manifest {path} has no '{column}' column (columns: {', '.join(header) or 'none'})")
    base = path.parent
    names, items = [], []
    for n, row in rows:
        if columns.image not in row or columns.caption not in row:
            raise bad(f"line {n}: no '{columns.image}' or '{columns.caption}'")
        image = str(row[columns.image] or "")
        mask = row.get(columns.mask)
        names.append(str(Path(image).with_suffix("")))
        items.append(Item("", str(base / image), str(row[columns.caption] or ""),
                          str(base / mask) if mask else None, source=image))
    for item, key in zip(items, _unique_keys(names)):
        item.key = key
    return items


def img2dataset_jobs(urls: list[str], on_error: Callable[[str, Exception], None]) -> list[Job]:
    def items(url: str) -> Iterator[Item]:
        for raw in read_tar_samples([{"url": url}], lambda e: on_error(url, e)):
            image = next((raw[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in raw), None)
            caption = raw["txt"].decode("utf-8", "replace") if "txt" in raw else None
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            yield Item(safe_key(raw["__key__"]), image if image is not None else b"", caption,
                       raw.get("mask.png"), source=str(meta.get("url") or f"{url}:{raw['__key__']}"), meta=meta)

    return [Job(Path(url).name, count_samples([url]), (lambda u=url: items(u))) for url in urls]


def discover(spec: str, shard_size: int, columns: Columns,
             on_shard_error: Callable[[str, Exception], None]) -> tuple[str, list[Job]]:
    """--input -> (kind, jobs). Raises InputError naming the flag and the path."""
    path = Path(spec).expanduser()
    is_pattern = any(c in spec for c in "*?[{")
    if not is_pattern and not path.exists():
        raise InputError(f"--input: not found: {spec}")
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return "manifest", _chunked(manifest_items(path, columns), shard_size)
    if path.is_dir():
        items = folder_items(path)
        if items:
            return "folder", _chunked(items, shard_size)
        if not any(path.glob("*.tar")):
            raise InputError(f"--input: no images or .tar shards in {spec}")
    elif path.is_file() and path.suffix.lower() != ".tar":
        raise InputError(f"--input: not a folder, .csv/.jsonl manifest or .tar shard: {spec}")
    try:
        urls = resolve_shards(spec, "--input")
    except ConfigError as e:
        raise InputError(str(e)) from e
    return "img2dataset", img2dataset_jobs(urls, on_shard_error)
