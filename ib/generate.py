"""`ib generate`: personalize from reference photos in one sampling run, no fine-tuning.

    ib generate --weights run.safetensors --ref a.jpg b.jpg --prompt "a photo of a sks dog on the beach" --out DIR
    [--base FOLDER] [--scheduler dpm++ --steps 20]
"""
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torchvision.utils import save_image

from ib.atomic_write import atomic_path, write_json
from ib.config_checks import OneLineParser, check_creatable_folder, check_device
from ib.data.masks import MaskError, get_mask_backend
from ib.errors import ConfigError
from ib.identifier import contains_identifier
from ib.data.references import prepare_references
from ib.models.sampler import SCHEDULERS, SamplingConfig, check_sampling
from ib.models.speed import SPEED_HELP, SPEED_PRESETS, check_speed_preset, default_preset
from ib.pipeline import InstantBoothPipeline, generate
from ib.ranges import PositiveInt, argument_type
from ib.weights import load_model


def add_model_arguments(p) -> None:
    """--weights, --base, --device, --speed: shared with `ib evaluate`."""
    p.add_argument("--weights", required=True,
                   help="an `ib export` .safetensors, a Lightning checkpoint, or a saved InstantBoothPipeline folder")
    p.add_argument("--base", help="another base model (diffusers folder or hub id) with the UNet shape of the one "
                                  "the weights were trained on, e.g. a fine-tune of it")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--speed", choices=sorted(SPEED_PRESETS), help=SPEED_HELP + " (default: graphs on CUDA, off on CPU)")


def load_pipeline(args, speed: str, device) -> InstantBoothPipeline:
    """The pipeline of --weights (on --base), with the speed preset, on `device`."""
    if Path(args.weights).is_dir():
        pipe = InstantBoothPipeline.from_pretrained(args.weights, speed=speed, base=args.base)
    else:
        model, hparams = load_model(args.weights, args.base, speed)
        defaults = SamplingConfig(**hparams.get("sampling", {}))
        pipe = InstantBoothPipeline.from_model(model, defaults.scheduler, defaults)
    return pipe.to(device)


def mask_backend_flag(name: str):
    """The backend of --mask-backend, built once (a model-based one loads its weights here)."""
    try:
        return get_mask_backend(name)
    except MaskError as e:
        raise ConfigError(f"--mask-backend: {e}") from e


def sampling_type(field: str):
    """The argparse type of a sampler flag: the range of SamplingConfig's field."""
    return argument_type(SamplingConfig, field)


def parser() -> OneLineParser:
    p = OneLineParser(prog="ib generate", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--ref", nargs="+", required=True, help="reference photos of the subject (any number)")
    p.add_argument("--mask", nargs="+", help="optional masks, one per --ref (white = subject)")
    p.add_argument("--mask-backend", help="compute masks for --ref without --mask (e.g. grabcut; see ib.data.masks)")
    p.add_argument("--prompt", required=True, help="must contain the identifier the model was trained with")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-images", type=argument_type(PositiveInt), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=sampling_type("beta"),
                   help="adapter strength (balanced sampling; default from the weights' config)")
    p.add_argument("--alpha", type=sampling_type("alpha"), help="concept renormalization factor")
    p.add_argument("--steps", type=sampling_type("steps"))
    p.add_argument("--guidance-scale", type=sampling_type("guidance_scale"))
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--height", type=sampling_type("height"))
    p.add_argument("--width", type=sampling_type("width"))
    p.add_argument("--batch-size", type=argument_type(PositiveInt), default=4)
    return p


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def sampling_from_args(base: SamplingConfig, args, vae_factor: int | None = None) -> SamplingConfig:
    """The weights' sampler settings with the flags given; checked (ib.models.sampler.check_sampling), errors
    naming the flag, or the field for a value that came with the weights."""
    overrides = {k: getattr(args, k) for k in ("beta", "alpha", "steps", "guidance_scale", "scheduler", "height", "width")
                 if getattr(args, k, None) is not None}
    cfg = replace(base, **overrides)
    check_sampling(cfg, vae_factor, lambda f: flag(f) if f in overrides else f"sampling.{f} (of the weights)")
    return cfg


def run(args) -> list[Path]:
    sampling_from_args(SamplingConfig(), args)  # the flags alone, before the model loads
    check_creatable_folder(args.out, "--out")
    device = str(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    speed = args.speed or default_preset(device)
    check_speed_preset(speed, device)
    mask_fn = mask_backend_flag(args.mask_backend) if args.mask_backend and not args.mask else None  # before loading
    pipe = load_pipeline(args, speed, device)
    identifier = pipe.identifier
    if not contains_identifier(args.prompt, identifier):
        raise ConfigError(f"--prompt: does not contain the identifier '{identifier}' (e.g. 'a photo of a "
                          f"{identifier} dog')")
    cfg = sampling_from_args(pipe.defaults, args, pipe.model.ldm.vae_scale_factor)
    refs = prepare_references(args.ref, args.mask or mask_fn, size=pipe.image_encoder.image_size[0], field="--ref",
                              mask_field="--mask" if args.mask else "--mask-backend")[None]

    start = time.perf_counter()
    images = []
    seeds = [args.seed + i for i in range(args.num_images)]
    for i in range(0, len(seeds), args.batch_size):
        chunk = seeds[i:i + args.batch_size]
        images.append(generate(pipe, refs.expand(len(chunk), *refs.shape[1:]), [args.prompt] * len(chunk), cfg, chunk))
    seconds = time.perf_counter() - start

    # Everything is generated before anything is written: a failure leaves no partial output.
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, image in zip(seeds, torch.cat(images)):
        paths.append(args.out / f"seed{seed:06d}.png")
        with atomic_path(paths[-1]) as tmp:
            save_image(image, tmp, format="png")
    settings = {"weights": str(args.weights), "refs": args.ref, "masks": args.mask,
                "mask_backend": None if args.mask else args.mask_backend, "prompt": args.prompt,
                "base": args.base, "seeds": seeds, "sampling": asdict(cfg), "device": device, "speed": speed, "seconds": round(seconds, 3),
                "images": [p.name for p in paths]}
    write_json(args.out / "settings.json", settings)
    print(f"wrote {len(paths)} images to {args.out} ({seconds:.2f} s sampling)")
    return paths


def main(argv: list[str]) -> int:
    run(parser().parse_args(argv))
    return 0
