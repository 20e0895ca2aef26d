"""Loader benchmark: samples/s per CPU core for decode + mask crop + augment at 512 px on real photos.

    make bench-data        # or: python bench/bench_data.py [--photos data/dreambench] [--repeats 5]

The DreamBench photos (captioned "a photo of a {class}") go through the shard builder with GrabCut masks;
the shards are then read back and every stage of the training transform is timed in one process with one
thread (torch, OpenCV) and timed in CPU seconds of that process, so the numbers are per core even on a
shared machine. Prints a table and writes bench/results/*.json.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_tools import build_shards  # noqa: E402
from ib.atomic_write import write_json  # noqa: E402
from ib.data.datamodule import InstantBoothDataModule, LoaderConfig, SampleTransform, batch_to_float  # noqa: E402
from ib.data.shards import decode_sample, read_tar_samples  # noqa: E402
from ib.data.streams import TrainStream  # noqa: E402
from ib.data.transforms import ReferenceAugment, mask_crop  # noqa: E402


def captioned_photos(photos: Path, dest: Path) -> str:
    """DreamBench subjects -> a folder input with NAME.txt captions; returns the class vocabulary."""
    lines = (photos / "prompts_and_classes.txt").read_text().splitlines()
    classes = dict(l.split(",", 1) for l in lines if l.count(",") == 1 and not l.startswith("subject_name"))
    for subject, cls in classes.items():
        for jpg in sorted((photos / subject).glob("*.jpg")):
            (dest / f"{subject}_{jpg.name}").symlink_to(jpg.resolve())
            (dest / f"{subject}_{jpg.stem}.txt").write_text(f"a photo of a {cls.strip()}")
    return ",".join(sorted({c.strip() for c in classes.values()}))


def per_sample_ms(fn, inputs: list, repeats: int) -> tuple[float, list]:
    out = [fn(x) for x in inputs[:2]]  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        out = [fn(x) for x in inputs]
    return (time.process_time() - start) / (repeats * len(inputs)) * 1e3, out


LOADER_SETTINGS = [  # data.loader variants timed through the real DataModule (wall clock: workers are processes)
    dict(num_workers=0),
    dict(num_workers=1),
    dict(num_workers=2),
    dict(num_workers=2, prefetch_factor=4),
    dict(num_workers=2, pin_memory=True),
]


def loader_sweep(shards: Path, a, batches: int) -> list[dict]:
    """Samples/s of InstantBoothDataModule.train_dataloader() per data.loader setting, after the first batch
    (worker start-up excluded). pin_memory needs CUDA; without it the row says so."""
    rows = []
    for setting in LOADER_SETTINGS:
        if setting.get("pin_memory") and not torch.cuda.is_available():
            rows.append({**setting, "samples_per_s": None, "note": "pin_memory needs CUDA"})
            continue
        dm = InstantBoothDataModule(train_shards=str(shards), image_size=a.image_size, reference_size=a.reference_size,
                                    batch_size=a.batch_size, batches_per_epoch=batches + 2,
                                    loader=LoaderConfig(**setting, shuffle_buffer=100))
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(it)["caption"])
        rows.append({**setting, "samples_per_s": round(n / (time.perf_counter() - start), 1)})
        del it
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, default=ROOT / "data" / "dreambench",
                   help="the DreamBench photos (one folder per subject)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--reference-size", type=int, default=224, help="the CLIP image encoder's input")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="passes over the samples per measurement")
    p.add_argument("--loader-batches", type=int, default=24, help="batches timed per data.loader setting")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    if not (a.photos / "prompts_and_classes.txt").is_file():
        print(f"error: --photos: no DreamBench at {a.photos}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    work = Path(tempfile.mkdtemp(prefix="bench_data."))
    try:
        (work / "photos").mkdir()
        vocabulary = captioned_photos(a.photos, work / "photos")
        start = time.process_time()
        build_shards.main(["--input", str(work / "photos"), "--output", str(work / "shards"), "--classes", vocabulary,
                           "--mask-backend", "grabcut", "--workers", "1"])
        build_s = time.process_time() - start
        report = json.loads((work / "shards" / "report.json").read_text())
        urls = sorted(str(u) for u in (work / "shards").glob("*.tar"))
        raw = list(read_tar_samples(({"url": u} for u in urls), on_error=print))

        aug = ReferenceAugment()
        tf = SampleTransform(a.image_size, a.reference_size, "sks", aug, train=True)
        rng = np.random.default_rng(0)
        rows = {}
        rows["decode (jpg + png + json)"], decoded = per_sample_ms(decode_sample, raw, a.repeats)
        rows["mask crop + fill"], objects = per_sample_ms(
            lambda s: mask_crop(s["image"], s["mask"], aug.fill, aug.bbox_jitter, rng), decoded, a.repeats)
        rows["reference augment"], _ = per_sample_ms(lambda o: tf.reference(image=o)["image"], objects, a.repeats)
        rows["target resize/crop/flip"], _ = per_sample_ms(
            lambda s: tf.target(image=s["image"], mask=s["mask"].astype(np.uint8)), decoded, a.repeats)
        rows["whole transform (+ caption, tensors)"], _ = per_sample_ms(tf, decoded, a.repeats)

        # End to end: the training stream itself (tar read, shuffle, decode, transform, uint8 batches).
        n_batches = max(1, a.repeats * len(raw) // a.batch_size)
        stream = TrainStream(urls, decode_sample, tf, batch_size=a.batch_size, batches_per_worker=n_batches,
                             resampled=True, rank=0, world=1, workers=0, seed=0, shuffle_buffer=100)
        next(iter(stream))
        start = time.process_time()
        for batch in stream:
            pass
        rows["training stream, end to end"] = (time.process_time() - start) / (n_batches * a.batch_size) * 1e3
        start = time.process_time()
        for _ in range(20):
            batch_to_float(dict(batch))
        float_ms = (time.process_time() - start) / (20 * a.batch_size) * 1e3
        loader_rows = loader_sweep(work / "shards", a, a.loader_batches)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nloader at {a.image_size} px (reference {a.reference_size} px), one process, one thread, CPU time, "
          f"{len(raw)} DreamBench photos with GrabCut masks")
    print(f"| stage | ms/sample | samples/s per core |\n|---|---:|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} |")
    print(f"\nshard build with GrabCut: {report['inputs']} photos, {report['kept']} kept, "
          f"{report['inputs'] / build_s:.1f} photos/s per core; uint8 -> float on the CPU would add "
          f"{float_ms:.2f} ms/sample (done on the device instead)")
    print(f"\ndata.loader settings through the DataModule (wall clock, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}):\n| setting | samples/s |\n|---|---:|")
    for r in loader_rows:
        name = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("samples_per_s", "note"))
        print(f"| {name} | {r['samples_per_s'] if r['samples_per_s'] is not None else r['note']} |")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__,
              "image_size": a.image_size, "reference_size": a.reference_size, "samples": len(raw),
              "ms_per_sample": {k: round(v, 3) for k, v in rows.items()},
              "samples_per_s_per_core": {k: round(1e3 / v, 1) for k, v in rows.items()},
              "build": {"photos": report["inputs"], "kept": report["kept"], "dropped": report["dropped"],
                        "photos_per_s_per_core": round(report["inputs"] / build_s, 2)},
              "float_conversion_ms_per_sample_cpu": round(float_ms, 3), "clock": "process CPU time",
              "loader_settings": loader_rows, "loader_settings_clock": "wall clock, after the first batch",
              "load_average": os.getloadavg()}
    a.output.mkdir(parents=True, exist_ok=True)
    path = a.output / f"bench_data-{platform.node()}-{datetime.date.today()}.json"
    write_json(path, result)  # atomically: a cut-short run leaves no half-written file
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
