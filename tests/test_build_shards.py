"""data_tools.build_shards: inputs in, training shards out (the schema ib.data reads), filters, report, resume,
bad input. Real photos from ../shared/dreambench go through GrabCut when that folder is there."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools import build_shards, filters
from data_tools.classes import ClassVocabulary, plural, read_classes
from ib.data.datamodule import InstantBoothDataModule
from ib.data.shards import decode_sample
from tests.conftest import ROOT
from tests.test_masks import object_photo

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"


def run(*args: str) -> int:
    return build_shards.main([str(a) for a in args])


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def blob_mask(size: int, *boxes) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


def read_output(out: Path) -> dict[str, dict]:
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)} if urls else {}


def check_schema(sample: dict) -> dict:
    """The builder's output must decode exactly as the DataModule decodes it."""
    s = decode_sample(sample)
    meta = s["meta"]
    assert meta["noun"] in s["caption"] and meta["concept"] == s["__key__"]
    x0, y0, x1, y1 = meta["bbox"]
    assert s["mask"][y0:y1, x0:x1].sum() == s["mask"].sum() > 0
    assert s["mask"][y0, x0:x1].any() and s["mask"][y0:y1, x0].any()  # tight
    return s


def test_vocabulary_synonyms_plurals_longest_match(tmp_path):
    assert [plural(w) for w in ("dog", "box", "puppy", "toy", "stuffed animal")] == \
        ["dogs", "boxes", "puppies", "toys", "stuffed animals"]
    spec = tmp_path / "classes.txt"
    spec.write_text("# class: synonyms\ndog: puppy\nstuffed animal: teddy bear\nanimal\n")
    v = ClassVocabulary(read_classes(str(spec)))
    assert [(m.cls, m.noun) for m in v.find("Two Puppies and a dog")] == [("dog", "Puppies"), ("dog", "dog")]
    assert [(m.cls, m.noun) for m in v.find("a stuffed  animal on a bed")] == [("stuffed animal", "stuffed  animal")]
    assert v.find("hotdogs and underdog") == []  # whole words only
    assert ClassVocabulary(read_classes("cat, dog")).classes == ["cat", "dog"]


@pytest.fixture
def captioned_folder(tmp_path) -> Path:
    """One image per filter outcome, with provided masks (no GrabCut: exact counts)."""
    root, n = tmp_path / "photos", 64
    img = lambda seed: np.random.default_rng(seed).integers(0, 255, (n, n, 3), dtype=np.uint8)
    one = blob_mask(n, (10, 40, 10, 40))                       # 0.22 of the frame
    cases = {  # name: (caption, mask or None)
        "ok_dog": ("a photo of a dog", one),
        "ok_puppies": ("Two puppies playing", one),
        "ok_speck": ("a cat on a sofa", blob_mask(n, (10, 40, 10, 40), (60, 62, 60, 62))),
        "no_class": ("a landscape at dusk", one),
        "two_classes": ("a dog and a cat", one),
        "no_mask": ("a dog", None),
        "small_mask": ("a dog", blob_mask(n, (0, 12, 0, 12))),         # 0.035
        "large_mask": ("a dog", blob_mask(n, (0, 60, 0, 64))),         # 0.94
        "two_objects": ("a dog", blob_mask(n, (0, 20, 0, 20), (40, 64, 40, 64))),
        "empty_caption": (" \n", one),
    }
    for i, (name, (caption, mask)) in enumerate(cases.items()):
        save(root / f"{name}.jpg", img(i))
        (root / f"{name}.txt").write_text(caption)
        if mask is not None:
            save(root / f"{name}.mask.png", mask)
    save(root / "sub" / "ok_png.png", img(50))                  # a PNG in a subfolder
    (root / "sub" / "ok_png.txt").write_text("a dog, close up")
    save(root / "sub" / "ok_png.mask.png", one)
    save(root / "tiny.jpg", img(60)[:16, :16])
    (root / "tiny.txt").write_text("a dog")
    save(root / "mis_sized.jpg", img(61))
    (root / "mis_sized.txt").write_text("a dog")
    save(root / "mis_sized.mask.png", one[:32])
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "broken.txt").write_text("a dog")
    save(root / "no_caption.jpg", img(62))
    save(root / "no_caption.mask.png", one)
    (tmp_path / "classes.txt").write_text("dog: puppy\ncat\n")
    return root


EXPECTED_DROPS = {"bad_mask": 1, "mask_too_large": 1, "mask_too_small": 1, "no_caption": 2, "no_class_noun": 1,
                  "no_mask": 1, "several_classes": 1, "several_objects": 1, "too_small": 1, "unreadable_image": 1}


def build_folder(source: Path, out: Path, *extra) -> int:
    classes = (source if source.is_dir() else source.parent).parent / "classes.txt"  # beside the photos folder
    return run("--input", source, "--output", out, "--classes", classes,
               "--mask-backend", "provided", "--min-size", 32, "--workers", 1, *extra)


def test_folder_with_provided_masks_filters_and_report(captioned_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert build_folder(captioned_folder, out) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == EXPECTED_DROPS
    assert report["kept"] == 4 and report["inputs"] == 4 + sum(EXPECTED_DROPS.values())
    assert "dropped several_objects" in capsys.readouterr().out

    samples = read_output(out)
    assert set(samples) == {"ok_dog", "ok_puppies", "ok_speck", "sub_ok_png"}
    decoded = {k: check_schema(s) for k, s in samples.items()}
    assert (decoded["ok_puppies"]["meta"]["class"], decoded["ok_puppies"]["meta"]["noun"]) == ("dog", "puppies")
    assert decoded["ok_speck"]["mask"].sum() == 30 * 30  # the speck was erased
    assert samples["ok_dog"]["jpg"] == (captioned_folder / "ok_dog.jpg").read_bytes()  # JPEG kept as it was
    assert Image.open(io.BytesIO(samples["sub_ok_png"]["jpg"])).format == "JPEG"

    dm = InstantBoothDataModule(str(out), image_size=32, reference_size=16, batch_size=4, batches_per_epoch=2)
    captions = {c for b in dm.train_dataloader() for c in b["caption"]}
    assert "Two sks puppies playing" in captions


def test_manifest_input_with_renamed_columns(captioned_folder, tmp_path):
    rows = [{"file": "ok_dog.jpg", "text": "a dog", "m": "ok_dog.mask.png"},
            {"file": "ok_speck.jpg", "text": "a cat", "m": ""},
            {"file": "missing.jpg", "text": "a dog", "m": "ok_dog.mask.png"}]
    for name, body in (("m.jsonl", "\n".join(json.dumps(r) for r in rows)),
                       ("m.csv", "file,text,m\n" + "\n".join(f"{r['file']},{r['text']},{r['m']}" for r in rows))):
        manifest = captioned_folder / name
        manifest.write_text(body)
        out = tmp_path / name
        assert build_folder(manifest, out, "--image-column", "file", "--caption-column", "text",
                            "--mask-column", "m") == 0
        report = json.loads((out / "report.json").read_text())
        assert (report["kept"], report["dropped"]) == (1, {"no_mask": 1, "unreadable_image": 1}), name
        assert set(read_output(out)) == {"ok_dog"}


def test_img2dataset_shards_in_training_shards_out(tmp_path):
    """img2dataset's layout (jpg/txt/json, 9-digit keys), GrabCut masks, one shard cut short."""
    src = tmp_path / "img2dataset"
    src.mkdir()
    captions = ["a red ball on the lawn", "a ball", "an empty field", "balls in the garden", "a ball"]
    for shard in range(2):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as sink:
            for i, caption in enumerate(captions):
                key = f"{shard:05d}{i:04d}"
                image, _ = object_photo(seed=10 * shard + i)
                jpg = io.BytesIO()
                Image.fromarray(image).save(jpg, format="JPEG", quality=95)
                sink.write({"__key__": key, "jpg": jpg.getvalue(), "txt": caption,
                            "json": json.dumps({"url": f"https://example.com/{key}.jpg", "key": key,
                                                "status": "success"})})
        (src / f"{shard:05d}_stats.json").write_text("{}")  # img2dataset's side files are ignored
    data = (src / "00001.tar").read_bytes()
    (src / "00001.tar").write_bytes(data[: data.index(b"000010004.jpg") + 512 + 100])  # last sample cut

    out = tmp_path / "out"
    assert run("--input", src, "--output", out, "--classes", "ball", "--min-size", 64, "--workers", 1) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"no_class_noun": 2, "unreadable_shard": 1}
    assert report["kept"] == 7 and report["inputs"] == 10
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # shard i -> shard i
    samples = read_output(out)
    for s in samples.values():
        meta = check_schema(s)["meta"]
        assert meta["class"] == "ball" and meta["mask_backend"] == "grabcut"
        assert meta["source"].startswith("https://example.com/") and 0.15 < meta["mask_area"] < 0.3


def test_resume_skips_finished_shards_and_never_leaves_partial_files(captioned_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert build_folder(captioned_folder, out, "--shard-size", 2) == 0
    report = (out / "report.json").read_text()
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 3
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    # Lose one shard: only that one is rebuilt.
    victim = shards[1].name
    (out / victim).unlink()
    (out / ".stats" / f"{victim}.json").unlink()
    assert build_folder(captioned_folder, out, "--shard-size", 2) == 0
    assert (out / "report.json").read_text() == report
    for p in shards:
        assert (p.stat().st_mtime_ns == stamps[p.name]) == (p.name != victim)

    # A crash in the middle of a shard leaves neither the shard nor a .tmp behind; the re-run completes it.
    (out / victim).unlink()
    (out / ".stats" / f"{victim}.json").unlink()
    calls = {"n": 0}
    real = filters.process

    def crash_on_second(item):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(item)

    monkeypatch.setattr(filters, "process", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_folder(captioned_folder, out, "--shard-size", 2)
    assert not (out / victim).exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(filters, "process", real)
    assert build_folder(captioned_folder, out, "--shard-size", 2) == 0
    assert (out / "report.json").read_text() == report

    # Other settings, or a changed input, into the same folder are refused.
    assert build_folder(captioned_folder, out, "--shard-size", 2, "--min-area", 0.2) == 2
    save(captioned_folder / "new.jpg", np.zeros((64, 64, 3), np.uint8))
    assert build_folder(captioned_folder, out, "--shard-size", 2) == 2
    assert (out / "report.json").read_text() == report


def test_bad_input_one_line_error_and_nothing_written(tmp_path, capsys):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "a.jpg", "caption": "a dog"}\n{not json\n')
    binary_csv = tmp_path / "binary.csv"
    binary_csv.write_bytes(b"\xff\xfe\x00garbage\x89")
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("image,text\na.jpg,a dog\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    cases = [  # (input, output, what the message must name)
        (tmp_path / "no_such_folder", tmp_path / "o1", "--input: not found: " + str(tmp_path / "no_such_folder")),
        (bad_jsonl, tmp_path / "o2", f"--input: cannot read manifest {bad_jsonl}: line 2"),
        (binary_csv, tmp_path / "o3", f"--input: cannot read manifest {binary_csv}"),
        (no_caption, tmp_path / "o4", f"--input: manifest {no_caption} has no 'caption' column"),
        (folder, a_file, f"--output: is a file: {a_file}"),
        (folder, tmp_path / "o5", f"--input: no images or .tar shards in {folder}"),
    ]
    for source, out, expected in cases:
        assert run("--input", source, "--output", out, "--classes", "dog") == 2, expected
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {expected}"), err
        assert not out.exists() or out == a_file
    assert a_file.read_text() == "keep me"
    assert run("--input", folder, "--output", tmp_path / "o6", "--classes", "dog", "--mask-backend", "clipseg") == 2
    assert capsys.readouterr().err.startswith("error: --mask-backend: mask backend 'clipseg' needs a model")
    assert run("--input", folder, "--output", tmp_path / "o7", "--classes", str(tmp_path / "nope.txt")) == 2
    assert capsys.readouterr().err.startswith("error: --classes: file not found")
    assert run("--input", folder, "--output", tmp_path / "o8", "--classes", "dog", "--mask-option", "colour=1") == 2
    assert capsys.readouterr().err.startswith("error: --mask-backend grabcut: TypeError:")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def test_command_line_entry_point(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "data_tools.build_shards"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0
    for flag in ("--input", "--output", "--mask-backend", "--classes", "--workers", "grabcut"):
        assert flag in r.stdout
    r = subprocess.run([*cmd, "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"),
                        "--classes", "dog"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --input: not found: {tmp_path / 'nothing'}"


@pytest.mark.slow
@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason=f"no DreamBench photos at {DREAMBENCH}")
def test_dreambench_photos_through_grabcut_into_training_batches(tmp_path):
    """Real photos, captioned 'a photo of a {class}', GrabCut masks from 2 worker processes, then batches."""
    classes = dict(line.split(",", 1) for line in (DREAMBENCH / "prompts_and_classes.txt").read_text().splitlines()
                   if line.count(",") == 1 and not line.startswith("subject_name"))
    photos = tmp_path / "photos"
    photos.mkdir()
    subjects = ["dog", "cat", "backpack", "bear_plushie"]
    for subject in subjects:
        for jpg in sorted((DREAMBENCH / subject).glob("*.jpg"))[:2]:
            shutil.copy(jpg, photos / f"{subject}_{jpg.name}")
            (photos / f"{subject}_{jpg.stem}.txt").write_text(f"a photo of a {classes[subject].strip()}")
    out = tmp_path / "shards"
    vocabulary = ",".join(classes[s].strip() for s in subjects)
    assert run("--input", photos, "--output", out, "--classes", vocabulary, "--workers", 2, "--shard-size", 2) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"] == 8 and report["kept"] + sum(report["dropped"].values()) == 8
    assert report["kept"] >= 5, report  # GrabCut separates most of these subjects from their backgrounds
    samples = read_output(out)
    assert len(samples) == report["kept"]
    for s in samples.values():
        d = check_schema(s)
        assert d["image"].shape == (512, 512, 3) and 0.1 <= d["mask"].mean() <= 0.7
        assert d["meta"]["class"] in d["caption"]

    dm = InstantBoothDataModule(str(out), str(out), image_size=64, reference_size=32, batch_size=2,
                                batches_per_epoch=3, val_batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(" sks " in c for b in batches for c in b["caption"])
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val_keys) == sorted(samples)  # one rank validates on every sample once


def picky_backend(**options):
    """A plugged-in backend (by import path) that fails on some images: those count, the build goes on."""
    def backend(image, box=None, prompt=None):
        if image.shape[0] != 64:
            raise RuntimeError("cannot handle this one")
        mask = np.zeros(image.shape[:2], bool)
        mask[16:48, 16:48] = True
        return mask
    return backend


def test_plugged_in_backend_by_import_path(tmp_path):
    photos = tmp_path / "photos"
    for name, size in (("a", 64), ("b", 48)):
        save(photos / f"{name}.jpg", np.full((size, size, 3), 90, np.uint8))
        (photos / f"{name}.txt").write_text("a dog")
    out = tmp_path / "out"
    assert run("--input", photos, "--output", out, "--classes", "dog", "--min-size", 32, "--workers", 1,
               "--mask-backend", "tests.test_build_shards:picky_backend") == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["kept"], report["dropped"]) == (1, {"mask_failed": 1})
    s = check_schema(read_output(out)["a"])
    assert s["meta"]["bbox"] == [16, 16, 48, 48] and s["meta"]["mask_backend"] == "tests.test_build_shards:picky_backend"


def test_max_side_downscales_provided_masks_with_their_images(captioned_folder, tmp_path):
    out = tmp_path / "out"
    assert build_folder(captioned_folder, out, "--max-side", 32) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["kept"], report["dropped"]) == (4, EXPECTED_DROPS)
    decoded = {k: check_schema(s) for k, s in read_output(out).items()}
    assert set(decoded) == {"ok_dog", "ok_puppies", "ok_speck", "sub_ok_png"}
    for s in decoded.values():
        assert s["image"].shape == (32, 32, 3) and s["mask"].shape == (32, 32)
        assert s["meta"]["bbox"] == [5, 5, 20, 20] and s["mask"].sum() == 15 * 15  # the 64 px mask, halved


def test_16bit_images_and_masks_and_huge_images(tmp_path):
    """A 16-bit photo and its 16-bit mask are scaled, not clipped (white photo, all-object mask); a
    decompression bomb is one dropped sample."""
    from tests.test_images import RAMP8, RAMP16, bomb_png

    photos = tmp_path / "photos"
    photo = np.tile(RAMP16[:1], (64, 1))                             # (64, 64) grey ramp over the full range
    mask = np.where(np.arange(64)[None, :] < 32, 40000, 30000).repeat(64, 0).astype(np.uint16)  # left half object
    save(photos / "deep.png", photo)
    save(photos / "deep.mask.png", mask)
    bomb_png(photos / "huge.png")
    save(photos / "huge.mask.png", np.zeros((8, 8), np.uint8))
    for name in ("deep", "huge"):
        (photos / f"{name}.txt").write_text("a dog")
    out = tmp_path / "out"
    assert run("--input", photos, "--output", out, "--classes", "dog", "--mask-backend", "provided",
               "--min-size", 32, "--workers", 1, "--max-area", 0.9) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["kept"], report["dropped"]) == (1, {"unreadable_image": 1})
    s = check_schema(read_output(out)["deep"])
    assert s["meta"]["mask_area"] == 0.5 and s["mask"][:, :32].all()
    assert np.abs(s["image"].astype(int) - RAMP8[:1, :, None]).max() <= 3  # JPEG-encoded


def test_output_folder_of_another_build_is_refused_unless_overwrite(captioned_folder, synthetic_shards, tmp_path,
                                                                    capsys):
    """Shards already in --output (same names: shard-000000.tar ...) would be overwritten in part and read
    together with the new ones. Refused, nothing written; --overwrite removes them first."""
    out = tmp_path / "out"
    shutil.copytree(synthetic_shards / "train", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([n for n in before if n.endswith(".tar")]) == 3
    assert build_folder(captioned_folder, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output: {out} holds 3 shards of another build"), err
    assert "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    assert build_folder(captioned_folder, out, "--overwrite") == 0
    assert set(read_output(out)) == {"ok_dog", "ok_puppies", "ok_speck", "sub_ok_png"}
    assert sorted(p.name for p in out.iterdir()) == [".stats", "build.json", "report.json", "shard-000000.tar"]
    assert build_folder(captioned_folder, out) == 0  # the same build again: a resume, nothing to do
    assert "resuming: 1 of 1 shards already built" in capsys.readouterr().out

    # Other settings: refused as before; with --overwrite the old build's shards are gone, not mixed in.
    assert build_folder(captioned_folder, out, "--shard-size", 3) == 2
    assert capsys.readouterr().err.startswith(f"error: --output: {out} holds shards built with other settings")
    assert build_folder(captioned_folder, out, "--shard-size", 3, "--overwrite") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shards"] == len(list(out.glob("*.tar"))) and len(read_output(out)) == report["kept"] == 4
    assert len(list((out / ".stats").iterdir())) == 5  # 15 inputs in shards of 3
    assert build_folder(captioned_folder, out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    assert len(list((out / ".stats").iterdir())) == 1

    # --output is the img2dataset input itself: its shards have the output's names. Refused even with --overwrite.
    capsys.readouterr()
    assert run("--input", out, "--output", out, "--classes", "dog", "--workers", 1, "--overwrite") == 2
    assert capsys.readouterr().err.strip() == f"error: --output: {out} is the input folder; use another folder"
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def cluttered_photo(seed: int, size: int = 128) -> np.ndarray:
    """A striped disc on a background of random rectangles: colours GrabCut's k-means can split many ways,
    so its masks depend on OpenCV's random state, as they do on real photos."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3)) + rng.uniform(0, 255, 3)
    for _ in range(30):
        (x0, y0), (w, h) = rng.integers(0, size, 2), rng.integers(5, size // 2, 2)
        image[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:size, 0:size]
    disc = np.hypot(x - size / 2, y - size / 2) < size * 0.3
    image[disc] = rng.uniform(0, 255, (3, 3))[(x[disc] // 6) % 3]
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def test_grabcut_masks_are_the_same_in_every_build_workers_and_resumes(tmp_path):
    photos = tmp_path / "photos"
    for i in range(8):
        save(photos / f"p{i}.png", cluttered_photo(i))
        (photos / f"p{i}.txt").write_text("a ball")

    def build(out: Path, workers: int) -> tuple[dict, dict]:
        assert run("--input", photos, "--output", out, "--classes", "ball", "--min-size", 64, "--shard-size", 4,
                   "--workers", workers) == 0
        return json.loads((out / "report.json").read_text()), {k: s["png"] for k, s in read_output(out).items()}

    report, masks = build(tmp_path / "a", 1)
    assert report["kept"] >= 3 and "mask_failed" not in report["dropped"], report
    assert build(tmp_path / "b", 1) == (report, masks)  # again in this process: OpenCV's random state moved on
    assert build(tmp_path / "c", 2) == (report, masks)  # two worker processes share the images out differently
    (tmp_path / "c" / "shard-000001.tar").unlink(missing_ok=True)
    (tmp_path / "c" / ".stats" / "shard-000001.tar.json").unlink()
    assert build(tmp_path / "c", 1) == (report, masks)  # a resume
