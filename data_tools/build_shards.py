"""Build training shards from captioned images: masks, the paper's filters, a report.

    python -m data_tools.build_shards --input PATH --output DIR --classes dog,cat [--mask-backend grabcut]

Input formats: data_tools/sources.py; filters and drop reasons: data_tools/filters.py; mask backends:
ib/data/masks.py; the output schema: docs/data.md ("Shard schema").

Resumable: each output shard is written as NAME.tar.tmp and renamed to NAME.tar when complete; its
counts then go to OUTPUT/.stats/NAME.json, and a re-run skips every shard that has them. An OUTPUT holding
another build's shards (other settings, OUTPUT/build.json, or .tar files of anything else) is refused, as
readers would mix them in; --overwrite removes them first. OUTPUT/report.json: kept, dropped by reason.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from ib.atomic_write import write_json
from data_tools import filters
from data_tools.classes import VocabularyError, read_classes
from data_tools.sources import Columns, InputError, Job, discover
from ib.data.masks import MaskError, mask_backend_names

TASKS_PER_WORKER = 16  # items handed to the pool at a time, per worker: bounds memory for in-shard bytes


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_tools.build_shards", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="a folder of images (+ NAME.txt captions, NAME.mask.png masks), "
                   "a .csv/.jsonl manifest, or img2dataset shards (folder, glob, brace pattern, .tar)")
    p.add_argument("--output", type=Path, required=True, help="folder for the shards and report.json")
    p.add_argument("--classes", required=True, help="comma list of class nouns, or a file of 'class: synonym, ...' lines")
    p.add_argument("--mask-backend", default="grabcut",
                   help=f"provided (the input's masks), one of {{{','.join(mask_backend_names())}}}, or module:factory "
                        "(default: grabcut)")
    p.add_argument("--mask-model", help="checkpoint folder or hub id for a model backend (e.g. clipseg)")
    p.add_argument("--mask-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the mask backend, e.g. iterations=3 (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    p.add_argument("--shard-size", type=int, default=1000, help="input samples per output shard (folder/manifest)")
    p.add_argument("--min-area", type=float, default=0.1, help="smallest mask area, fraction of the frame")
    p.add_argument("--max-area", type=float, default=0.7, help="largest mask area, fraction of the frame")
    p.add_argument("--min-object", type=float, default=0.02,
                   help="smallest connected part that counts as an object, fraction of the frame (smaller: erased)")
    p.add_argument("--min-size", type=int, default=256, help="smallest shorter image side, px")
    p.add_argument("--max-side", type=int, default=0, help="downscale so the longer side is at most this (0: keep)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="when an image must be re-encoded")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the shards of an earlier build in --output and build afresh (without it, another "
                        "build's shards there are refused and the same build resumes)")
    for column in ("image", "caption", "mask"):
        p.add_argument(f"--{column}-column", default=column, help=f"manifest column of the {column}")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> filters.FilterConfig:
    """All the cheap checks, before anything is written. Raises InputError naming the flag."""
    if a.output.exists() and not a.output.is_dir():
        raise InputError(f"--output: is a file: {a.output}")
    for flag, ok in (("--workers", a.workers >= 1), ("--shard-size", a.shard_size >= 1),
                     ("--min-area/--max-area", 0 <= a.min_area < a.max_area <= 1),
                     ("--min-object", 0 <= a.min_object <= 1), ("--min-size", a.min_size >= 1),
                     ("--max-side", a.max_side >= 0), ("--jpeg-quality", 1 <= a.jpeg_quality <= 100)):
        if not ok:
            raise InputError(f"{flag}: out of range")
    try:
        classes = read_classes(a.classes)
    except VocabularyError as e:
        raise InputError(f"--classes: {e}") from e
    options = dict(a.mask_option)
    if a.mask_model:
        options["model"] = a.mask_model
    return filters.FilterConfig(classes=classes, mask_backend=a.mask_backend, mask_options=options,
                                min_area=a.min_area, max_area=a.max_area, min_object=a.min_object,
                                min_size=a.min_size, max_side=a.max_side, jpeg_quality=a.jpeg_quality)


def write_shard(job: Job, out: Path, run_items, chunk_size: int, shard_errors: Counter, bar: tqdm) -> dict:
    """Process one job into out/NAME.tar (written as NAME.tar.tmp, then renamed); returns its counts."""
    final, tmp = out / job.name, out / f"{job.name}.tmp"
    stats = {"inputs": 0, "kept": 0, "dropped": Counter()}
    try:
        with open(tmp, "wb") as stream, wds.TarWriter(stream) as sink:
            items = job.items()
            while chunk := list(islice(items, chunk_size)):
                for _, sample, reason in run_items(chunk):
                    stats["inputs"] += 1
                    if sample is None:
                        stats["dropped"][reason] += 1
                    else:
                        sink.write(sample)
                        stats["kept"] += 1
                    bar.update()
        if shard_errors[job.name]:  # the sample being read when the shard broke off
            stats["inputs"] += shard_errors[job.name]
            stats["dropped"]["unreadable_shard"] += shard_errors[job.name]
        if stats["kept"]:
            os.replace(tmp, final)
        else:  # no empty shards: a reader's worker that owns one would run out of batches
            final.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def build(a: argparse.Namespace) -> dict:
    cfg = check_args(a)
    try:
        builder = filters.SampleBuilder(cfg)  # fails early on an unknown or unloadable mask backend
    except MaskError as e:
        raise InputError(f"--mask-backend: {e}") from e
    except Exception as e:  # a backend factory's own error, e.g. an option it does not take
        raise InputError(f"--mask-backend {cfg.mask_backend}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    shard_errors: Counter = Counter()

    def on_shard_error(url: str, exn: Exception) -> None:
        shard_errors[Path(url).name] += 1
        tqdm.write(f"warning: {exn}")

    columns = Columns(a.image_column, a.caption_column, a.mask_column)
    kind, jobs = discover(a.input, a.shard_size, columns, on_shard_error)
    settings = {"input": str(Path(a.input).expanduser().resolve()) if Path(a.input).exists() else a.input,
                "kind": kind, "samples": sum(j.count for j in jobs),  # the input must not change under a resume
                "shard_size": a.shard_size, "filters": asdict(cfg), "columns": asdict(columns)}
    out, stats_dir = a.output, a.output / ".stats"
    check_output(out, a.input, kind, settings, jobs, a.overwrite)
    stats_dir.mkdir(parents=True, exist_ok=True)
    write_json(out / "build.json", settings, sort_keys=True)

    pending = [j for j in jobs if not (stats_dir / f"{j.name}.json").is_file()]
    workers = min(a.workers, max(1, sum(j.count for j in pending)))
    if len(pending) < len(jobs):
        print(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} shards already built")
    pool = None
    if workers > 1:
        # spawn: no forked OpenCV/torch thread state in the workers
        pool = multiprocessing.get_context("spawn").Pool(workers, filters.init_worker, (asdict(cfg),))
        run_items = lambda chunk: pool.imap(filters.process, chunk)
    else:
        filters._builder = builder
        run_items = lambda chunk: map(filters.process, chunk)
    try:
        with tqdm(total=sum(j.count for j in pending), unit="img", desc="build shards", dynamic_ncols=True) as bar:
            kept = 0
            for job in pending:
                stats = write_shard(job, out, run_items, TASKS_PER_WORKER * workers, shard_errors, bar)
                write_json(stats_dir / f"{job.name}.json", stats, sort_keys=True)
                kept += stats["kept"]
                bar.set_postfix(kept=kept)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return write_report(out, jobs, stats_dir)


def check_output(out: Path, spec: str, kind: str, settings: dict, jobs: list[Job], overwrite: bool) -> None:
    """Refuse an output folder holding another build's shards (a reader takes every .tar there), or, with
    overwrite, remove them. The same build (same settings, its own shard names) resumes."""
    source = Path(spec).expanduser()
    if kind == "img2dataset" and out.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise InputError(f"--output: {out} is the input folder; use another folder")  # output i = input i's name
    if not out.is_dir():
        return
    previous = out / "build.json"
    try:
        same = previous.is_file() and json.loads(previous.read_text()) == settings
    except (OSError, ValueError):
        same = False  # unreadable: another build's, as far as can be told
    ours = {j.name for j in jobs} if same else set()
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in ours)
    if overwrite:
        for name in [*out.glob("*.tar"), *out.glob("*.tar.tmp"), out / "report.json", previous]:
            Path(name).unlink(missing_ok=True)
        shutil.rmtree(out / ".stats", ignore_errors=True)
    elif previous.is_file() and not same:
        raise InputError(f"--output: {out} holds shards built with other settings ({previous}); use a new folder "
                         "or --overwrite")
    elif foreign:
        raise InputError(f"--output: {out} holds {len(foreign)} shards of another build ({', '.join(foreign[:2])}"
                         f"{', ...' if len(foreign) > 2 else ''}); "
                         "use a new folder or --overwrite")


def write_report(out: Path, jobs: list[Job], stats_dir: Path) -> dict:
    kept, inputs, dropped, shards = 0, 0, Counter(), 0
    for job in jobs:
        s = json.loads((stats_dir / f"{job.name}.json").read_text())
        kept, inputs = kept + s["kept"], inputs + s["inputs"]
        dropped.update(s["dropped"])
        shards += (out / job.name).is_file()
    report = {"inputs": inputs, "kept": kept, "dropped": dict(sorted(dropped.items())), "shards": shards}
    write_json(out / "report.json", report, sort_keys=True)
    print(f"{inputs} inputs, {kept} kept in {shards} shards at {out}")
    for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
        print(f"  dropped {reason:<18} {n:>8}")
    return report


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        build(a)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
