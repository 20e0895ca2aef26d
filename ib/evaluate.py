"""`ib evaluate`: DreamBench-protocol numbers (CLIP-I, CLIP-T, DINO) for a trained model.

For every subject × prompt it generates --num-images images (image i with seed --seed + i) through the
sampler `ib generate` uses, saves them as OUT/<subject>/<prompt>_<i>.png and writes OUT/report.json.
Images already in OUT are reused, so an interrupted run continues where it stopped; OUT/settings.json
makes sure they were generated with the same weights, sampler settings and seed.
"""
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ib.data.dreambench import DreamBench, Subject, load_image, read_dreambench, to_tensor  # noqa: E402
from ib.data.references import NoSubjectError, prepare_references  # noqa: E402
from ib.atomic_write import atomic_path, write_json  # noqa: E402
from ib.config_checks import OneLineParser, check_creatable_folder, check_device  # noqa: E402
from ib.errors import ConfigError  # noqa: E402
from ib.generate import add_model_arguments, load_pipeline, mask_backend_flag, sampling_from_args, sampling_type  # noqa: E402
from ib.metrics.backbones import ClipBackboneConfig, DinoBackboneConfig  # noqa: E402
from ib.metrics.identity import identity_metrics  # noqa: E402
from ib.identifier import strip_identifier  # noqa: E402
from ib.models.sampler import SCHEDULERS, SamplingConfig  # noqa: E402
from ib.models.speed import check_speed_preset, default_preset  # noqa: E402
from ib.pipeline import WEIGHTS_FILE, generate  # noqa: E402
from ib.ranges import PositiveInt, argument_type  # noqa: E402

SETTINGS_FILE = "settings.json"
REPORT_FILE = "report.json"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="ib evaluate", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="a DreamBench-layout folder (subject folders + prompts_and_classes.txt)")
    p.add_argument("--out", required=True, help="folder for the generated images and report.json")
    p.add_argument("--max-subjects", type=argument_type(PositiveInt),
                   help="the first N subjects (sorted as in the prompts file)")
    p.add_argument("--max-prompts", type=argument_type(PositiveInt), help="the first N prompts of each subject")
    p.add_argument("--num-images", type=argument_type(PositiveInt), default=4, help="images per prompt (DreamBooth: 4)")
    p.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    p.add_argument("--mask-backend", help="mask each reference photo's subject with this backend (e.g. grabcut; see "
                                          "ib.data.masks), as training saw masked crops; default: whole photos")
    g = p.add_argument_group("sampler (default: the settings stored with the weights)")
    g.add_argument("--steps", type=sampling_type("steps"))
    g.add_argument("--beta", type=sampling_type("beta"), help="adapter strength at inference (paper: 0.3)")
    g.add_argument("--alpha", type=sampling_type("alpha"), help="concept renormalization (paper: 0.4)")
    g.add_argument("--guidance-scale", type=sampling_type("guidance_scale"))
    g.add_argument("--scheduler", choices=SCHEDULERS)
    b = p.add_argument_group("metric backbones (default: CLIP ViT-B-32 'openai' and DINO ViT-S/16)")
    b.add_argument("--backbones", help="YAML with `clip:` and `dino:` sections (fields of ClipBackboneConfig / "
                                       "DinoBackboneConfig), e.g. conf/metrics/tiny.yaml; the flags below override it")
    b.add_argument("--clip-model", help="open_clip architecture")
    b.add_argument("--clip-pretrained", help="open_clip tag (openai) or checkpoint file; 'none' for random weights")
    b.add_argument("--dino-model", help="timm architecture")
    b.add_argument("--dino-weights", help="DINO checkpoint file (original layout, e.g. dino_deitsmall16_pretrain.pth, or timm's)")
    return p


def _looks_like_file(value: str) -> bool:
    return bool(Path(value).suffix) or "/" in value


def backbone_configs(args) -> tuple[ClipBackboneConfig, DinoBackboneConfig]:
    sections = {"clip": {}, "dino": {}}
    if args.backbones:
        try:
            loaded = yaml.safe_load(Path(args.backbones).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--backbones: cannot read {args.backbones}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--backbones: {args.backbones} is not valid YAML") from e
        unknown = set(loaded) - set(sections) if isinstance(loaded, dict) else {"(not a mapping)"}
        if unknown:
            raise ConfigError(f"--backbones: {args.backbones}: unknown section {sorted(unknown)[0]} (clip, dino)")
        sections.update({k: v or {} for k, v in loaded.items()})
    elif not args.dino_weights:
        raise ConfigError("--dino-weights: required for DreamBench numbers (a DINO ViT-S/16 file, e.g. "
                          "dino_deitsmall16_pretrain.pth), or choose backbones with --backbones FILE")
    for flag, section, key in (("clip_model", "clip", "model_name"), ("clip_pretrained", "clip", "pretrained"),
                               ("dino_model", "dino", "model_name"), ("dino_weights", "dino", "weights")):
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "clip_pretrained" and value.lower() == "none":
            value = None
        elif flag in ("clip_pretrained", "dino_weights") and _looks_like_file(value) and not Path(value).is_file():
            raise ConfigError(f"--{flag.replace('_', '-')}: file not found: {value}")
        sections[section][key] = value
    try:
        return ClipBackboneConfig(**sections["clip"]), DinoBackboneConfig(**sections["dino"])
    except TypeError as e:
        raise ConfigError(f"--backbones: {args.backbones}: {e}") from e


def _file_digest(path: str) -> str:
    if Path(path).is_dir():  # a saved pipeline: its trained part
        path = Path(path) / WEIGHTS_FILE
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_out_folder(out: Path, settings: dict) -> None:
    """Images in OUT are reused only when they were generated with the same settings."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise ConfigError(f"--out: {out} holds images generated with other settings ({changed[0]}: "
                              f"{old.get(changed[0])} -> {settings[changed[0]]}); use another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings, allow_nan=False)


def image_path(out: Path, subject: Subject, prompt_index: int, prompt: str, i: int) -> Path:
    slug = re.sub(r"\W+", "_", prompt).strip("_")[:60]
    return out / subject.name / f"{prompt_index:02d}_{slug}_{i}.png"


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except OSError:
        return False


def _save(image: torch.Tensor, path: Path) -> None:
    """Atomically: a killed run never leaves a half-written image to be reused."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _number(x: torch.Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else round(value, 6)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def subject_references(subject: Subject, mask_fn, size: int) -> tuple[torch.Tensor | None, list[str]]:
    """The subject's photos as references, and the names of those left out: with a mask backend, a photo it
    finds no subject in is left out and named on stderr; None when none is left."""
    if mask_fn is None:
        return prepare_references(subject.images, size=size, field="--data"), []
    refs, left_out = [], []
    for photo in subject.images:
        try:
            refs.append(prepare_references([photo], mask_fn, size=size, field="--data", mask_field="--mask-backend"))
        except NoSubjectError as e:
            left_out.append(photo.name)
            print(f"ib evaluate: {e}: left out of the references", file=sys.stderr)
    return (torch.cat(refs) if refs else None), left_out


def all_references(subjects: list[Subject], mask_fn, size: int,
                   args) -> tuple[dict[str, tuple[torch.Tensor, list[str]]], list[str]]:
    """{subject: (references, photos left out)}, and the subjects left out: like a corrupt sample in training, a
    subject without a usable photo is skipped and named; with none usable at all there is nothing to evaluate."""
    references = {s.name: subject_references(s, mask_fn, size) for s in subjects}
    skipped = [name for name, (refs, _) in references.items() if refs is None]
    if len(skipped) == len(subjects):
        raise ConfigError(f"--mask-backend: {args.mask_backend} finds no subject in any photo of {args.data}")
    if skipped:
        print(f"ib evaluate: {len(skipped)} subjects without a photo {args.mask_backend} finds a subject in, "
              f"left out: {', '.join(skipped)}", file=sys.stderr)
    return {name: value for name, value in references.items() if name not in skipped}, skipped


def generate_subject(pipe, sampling, refs: torch.Tensor, bench: DreamBench, subject: Subject, out: Path, args,
                     bar) -> tuple[list[torch.Tensor], list[str]]:
    """The subject's images for every prompt (those already in `out` are reused), read back from their files
    so that a resumed run scores exactly what a fresh one would; and their prompts."""
    generated, prompts = [], []
    identifier = pipe.identifier
    for j, prompt in enumerate(bench.prompts(subject, identifier)[:args.max_prompts]):
        paths = [image_path(out, subject, j, strip_identifier(prompt, identifier), i) for i in range(args.num_images)]
        todo = [i for i, p in enumerate(paths) if not _readable(p)]
        if todo:
            images = generate(pipe, refs[None].expand(len(todo), *refs.shape), [prompt] * len(todo),
                              sampling, seeds=[args.seed + i for i in todo])
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            for i, image in zip(todo, images):
                _save(image, paths[i])
        generated += [to_tensor(load_image(p)) for p in paths]
        prompts += [prompt] * len(paths)
        bar.set_postfix(subject=subject.name, generated=len(todo))
        bar.update()
    return generated, prompts


def evaluate(args) -> dict:
    if not Path(args.weights).exists():  # checked again on loading; here to fail before anything is built
        raise ConfigError(f"--weights: file not found: {args.weights}")
    check_creatable_folder(Path(args.out), "--out")
    sampling_from_args(SamplingConfig(), args)  # the flags alone, before the model loads
    mask_fn = mask_backend_flag(args.mask_backend) if args.mask_backend else None
    bench: DreamBench = read_dreambench(args.data)
    subjects = bench.subjects[:args.max_subjects]
    clip_cfg, dino_cfg = backbone_configs(args)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    speed = getattr(args, "speed", None) or default_preset(device.type)
    check_speed_preset(speed, device)

    pipe = load_pipeline(args, speed, device)
    model, identifier = pipe.model, pipe.identifier
    sampling = sampling_from_args(pipe.defaults, args, model.ldm.vae_scale_factor)
    metrics = {k: m.to(device) for k, m in identity_metrics(clip_cfg, dino_cfg, identifier).items()}

    # Every subject's references before anything is written.
    references, skipped = all_references(subjects, mask_fn, model.image_encoder.image_size[0], args)
    subjects = [s for s in subjects if s.name in references]

    out = Path(args.out)
    # The speed preset is part of what made the images (bf16 gives other bits): a resume must not mix them.
    settings = {"weights_sha256": _file_digest(args.weights), "base": args.base, "sampling": asdict(sampling), "seed": args.seed,
                "identifier": identifier, "speed": speed}
    if args.mask_backend:  # only when set: folders written before the flag existed still resume
        settings["mask_backend"] = args.mask_backend
    check_out_folder(out, settings)

    per_subject = {}
    total = sum(len(bench.templates(s)[:args.max_prompts]) for s in subjects)
    with tqdm(total=total, desc="ib evaluate", unit="prompt") as bar:
        for subject in subjects:
            refs, left_out = references[subject.name]
            generated, prompts = generate_subject(pipe, sampling, refs.to(device), bench, subject, out, args, bar)
            reals = [to_tensor(load_image(p)) for p in subject.images]
            per_subject[subject.name] = score_subject(metrics, generated, prompts, reals)
            per_subject[subject.name].update({"class": subject.class_noun, "images": len(generated),
                                              "references": len(refs), "left_out": left_out})

    keys = ("clip_i", "clip_t", "dino")
    overall = {k: _mean([s[k] for s in per_subject.values()]) for k in keys}
    overall["real_vs_real"] = {k: _mean([s["real_vs_real"][k] for s in per_subject.values()]) for k in ("clip_i", "dino")}
    report = {"overall": overall, "per_subject": per_subject,
              "settings": {**settings, "weights": str(args.weights), "data": str(args.data),
                           "subjects": len(subjects), "subjects_left_out": skipped, "max_prompts": args.max_prompts, "num_images": args.num_images},
              "backbones": {"clip": asdict(clip_cfg), "dino": asdict(dino_cfg)}}
    write_json(out / REPORT_FILE, report, allow_nan=False)
    return report


def score_subject(metrics: dict, generated: list, prompts: list[str], reals: list) -> dict:
    """Generated vs real (CLIP-I, DINO), generated vs prompt (CLIP-T), and real vs real (the upper reference;
    CLIP-T has none: the references were not taken for these prompts)."""
    metrics["clip_i"].update(generated, reals)
    metrics["dino"].update(generated, reals)
    metrics["clip_t"].update(generated, prompts)
    scores = {k: _number(m.compute()) for k, m in metrics.items()}
    real_vs_real = {}
    for k in ("clip_i", "dino"):
        metrics[k].reset()
        metrics[k].update(reals)
        real_vs_real[k] = _number(metrics[k].compute())
    for m in metrics.values():
        m.reset()
    return {**scores, "real_vs_real": real_vs_real}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        report = evaluate(args)
    except ConfigError as e:
        print(f"ib: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    o = report["overall"]
    print(f"DINO {o['dino']}  CLIP-I {o['clip_i']}  CLIP-T {o['clip_t']}  "
          f"(real vs real: DINO {o['real_vs_real']['dino']}, CLIP-I {o['real_vs_real']['clip_i']}) "
          f"-> {Path(args.out) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
