"""Does identity transfer to held-out concepts? `make experiment` (after the toy base and InstantBooth runs).

On the held-out (validation) concepts of the synthetic world, at fixed timesteps and fixed noise:
  loss_own       — denoising loss with references of the target's own concept (other images of it)
  loss_shuffled  — with references of another held-out concept of the same class
  loss_base      — adapters and concept token off, identifier removed: the frozen base alone
each also inside the object (loss_*_object: the squared error weighted by the fraction of each latent cell the
target's object mask covers; the references describe the object, the background is the prompt's business);
the same pair with the adapters off, the concept token off and both off (`ablations`; both off: gap 0 by
construction); and colour identity scores (ib/metrics/colour_identity.py) of images generated with own vs
shuffled references, with the gap's standard error over concepts and the number of concepts where own is above.
Writes OUT/report.json and OUT/grid.png (reference | generated with own refs | generated with shuffled refs |
the shuffled reference).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from ib.data.references import prepare_references
from ib.data.shards import decode_sample, resolve_shards
from ib.data.transforms import target_transform
from ib.identifier import insert_identifier, strip_identifier
from ib.metrics.colour_identity import colour_identity
from ib.models.sampler import SCHEDULERS, SamplingConfig
from ib.pipeline import InstantBoothPipeline, generate
from ib.weights import load_model

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "toy_experiment.yaml"  # the measurement's settings
# (concept token used, adapter strength β) per setting; "full" is the model as trained. With both off the
# references reach nothing and own = shuffled; the identifier is dropped from the prompt whenever the concept is off.
SETTINGS = {"full": (True, 1.0), "adapters_off": (True, 0.0), "concept_off": (False, 1.0), "both_off": (False, 0.0)}


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255


def load_concepts(shards: str) -> dict[str, list[dict]]:
    by_concept = defaultdict(list)
    for raw in wds.WebDataset(resolve_shards(shards, "--data"), shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        by_concept[s["meta"]["concept"]].append(s)
    return dict(sorted(by_concept.items()))


def shuffled_partner(concepts: dict[str, list[dict]]) -> dict[str, str]:
    """Each concept -> another concept of the same class (a rotation within the class)."""
    by_class = defaultdict(list)
    for c, samples in concepts.items():
        by_class[samples[0]["meta"]["class"]].append(c)
    partner = {}
    for members in by_class.values():
        if len(members) < 2:
            raise SystemExit(f"error: class of {members[0]} has one held-out concept; shuffling needs two")
        for i, c in enumerate(members):
            partner[c] = members[(i + 1) % len(members)]
    return partner


class Experiment:
    def __init__(self, weights: str, data: str, num_refs: int, timesteps: list[int], seed: int):
        self.model, self.hparams = load_model(weights)
        self.pipe = InstantBoothPipeline.from_model(self.model)
        self.concepts = load_concepts(data)
        self.partner = shuffled_partner(self.concepts)
        self.num_refs, self.timesteps, self.seed = num_refs, timesteps, seed
        self.target = target_transform(self.model.ldm.image_size, train=False)

    def refs(self, concept: str, exclude_key: str | None) -> torch.Tensor:
        """(num_refs, 3, R, R): masked object crops of the concept's images, other than the target."""
        chosen = [s for s in self.concepts[concept] if s["__key__"] != exclude_key][: self.num_refs]
        return prepare_references([s["image"] for s in chosen], [s["mask"] for s in chosen],
                                  size=self.model.image_encoder.image_size[0], field="--data")

    def object_pixels(self, concept: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([s["image"][s["mask"]] for s in self.concepts[concept]]))

    @torch.no_grad()
    def losses(self, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict:
        """Fixed-noise losses of each setting in `settings` (names in SETTINGS); a setting's numbers do not
        depend on which others are computed beside it. A concept's images go through the UNet as one batch (all
        their references have the same length): on a CPU that is several times faster than one image at a time."""
        m, sched = self.model, self.model.ldm.noise_scheduler
        identifier = m.identifier
        totals = defaultdict(lambda: np.zeros(len(self.timesteps)))
        object_totals = defaultdict(lambda: np.zeros(len(self.timesteps)))
        t = torch.tensor(self.timesteps)
        n = 0
        gen = torch.Generator().manual_seed(self.seed)
        for concept, samples in tqdm(self.concepts.items(), desc="fixed-noise losses", unit="concept"):
            noisy, noise, weights, captions, own = [], [], [], [], []
            for s in samples:  # latents and noise drawn image by image: the same whatever the batching
                target = self.target(image=s["image"], mask=s["mask"].astype(np.uint8))
                latents = m.ldm.encode_images(to_tensor(target["image"])[None], generator=gen)
                eps = torch.randn((len(t), *latents.shape[1:]), generator=gen)
                noisy.append(sched.add_noise(latents.expand(len(t), -1, -1, -1), eps, t))
                noise.append(eps)
                # The fraction of each latent cell covered by the object: weights of the object-region loss.
                weights.append(F.interpolate(torch.from_numpy(target["mask"] > 0).float()[None, None],
                                             size=latents.shape[-2:], mode="area")[0, 0])
                captions.append(insert_identifier(s["caption"], s["meta"]["class"], identifier))
                own.append(self.refs(concept, s["__key__"]))
            k = len(samples)
            noisy, noise, weight = torch.cat(noisy), torch.cat(noise), torch.stack(weights)  # (k·T, ...), (k, h, w)
            per_image = lambda x: x.repeat_interleave(len(t), dim=0)  # image i's rows: i·T ... i·T + T - 1
            # The partner's references are encoded k times, in a batch shaped as own's: equal references then give
            # bitwise equal tokens (a batch of one can differ in the last bit), so a gap is never float noise.
            encoded = {"own": m.encode_references(torch.stack(own)),
                       "shuffled": m.encode_references(self.refs(self.partner[concept], None)[None].expand(k, -1, -1, -1, -1))}
            for setting in settings:
                use_concept, beta = SETTINGS[setting]
                prompts = captions if use_concept else [strip_identifier(c, identifier) for c in captions]
                for which, (concept_vec, visual) in encoded.items():
                    text = m.encode_prompts(prompts, concept_vec if use_concept else None)
                    pred = m.predict_noise(noisy, t.repeat(k), per_image(text), per_image(visual), beta)
                    err = ((pred - noise) ** 2).mean(dim=1).unflatten(0, (k, len(t)))  # (k, T, h, w)
                    totals[setting, which] += err.mean(dim=(2, 3)).sum(0).numpy()
                    object_totals[setting, which] += ((err * weight[:, None]).sum(dim=(2, 3))
                                                      / weight.sum(dim=(1, 2))[:, None]).sum(0).numpy()
            n += k
        per_t = lambda v: dict(zip(map(str, self.timesteps), (v / n).round(5).tolist()))
        return {setting: {which: {"mean": float(totals[setting, which].mean() / n),
                                  "per_timestep": per_t(totals[setting, which]),
                                  "object_mean": float(object_totals[setting, which].mean() / n),
                                  "object_per_timestep": per_t(object_totals[setting, which])}
                          for which in ("own", "shuffled")} for setting in settings}

    @torch.no_grad()
    def identity(self, cfg: SamplingConfig, prompts_per_concept: int) -> tuple[dict, torch.Tensor]:
        """-> mean scores with own and shuffled references, their gap and its standard error, and the grid.
        The error is over concepts (a concept's prompts share its references: not independent samples)."""
        scores = defaultdict(list)
        gaps = []
        rows = []
        for i, (concept, ss) in enumerate(tqdm(self.concepts.items(), desc="identity", unit="concept")):
            own, other = self.refs(concept, None), self.refs(self.partner[concept], None)
            ref_pixels = self.object_pixels(concept)
            mine = defaultdict(list)  # this concept's scores
            for j, s in enumerate(ss[:prompts_per_concept]):
                prompt = insert_identifier(s["caption"], s["meta"]["class"], self.model.identifier)
                seed = self.seed + 1000 * i + j
                g_own = generate(self.pipe, own[None], [prompt], cfg, [seed])[0]
                g_shuf = generate(self.pipe, other[None], [prompt], cfg, [seed])[0]
                for name, g in (("own", g_own), ("shuffled", g_shuf)):
                    mine[name].append(colour_identity(g, ref_pixels))
                if j == 0:
                    size = g_own.shape[-1]
                    up = lambda x: torch.nn.functional.interpolate(x[None], size=size, mode="bilinear")[0]
                    rows.append(torch.stack([up(own[0]), g_own, g_shuf, up(other[0])]))
            for name, values in mine.items():
                scores[name] += values
            gaps.append(np.mean(mine["own"]) - np.mean(mine["shuffled"]))
        grid = make_grid(torch.cat(rows), nrow=4, padding=1, pad_value=1.0)
        means = {k: float(np.mean(v)) for k, v in scores.items()}
        se = float(np.std(gaps, ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
        return {**means, "gap": float(np.mean(gaps)), "gap_se": se,
                "concepts_own_above": int(np.sum(np.array(gaps) > 0))}, grid


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=CONFIG)
    known, _ = pre.parse_known_args(argv)
    cfg = yaml.safe_load(known.config.read_text())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pre])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="held-out concept shards (e.g. data/toyworld/val)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-refs", type=int)
    p.add_argument("--timesteps", type=int, nargs="+")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--prompts-per-concept", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(**{k: v for k, v in cfg.items() if k != "identity_at"})
    a = p.parse_args(argv)
    exp = Experiment(a.weights, a.data, a.num_refs, a.timesteps, a.seed)
    losses = exp.losses()
    at = cfg["identity_at"]
    trained = SamplingConfig(a.scheduler, a.sample_steps, a.guidance_scale, **at["trained"])
    balanced = SamplingConfig(a.scheduler, a.sample_steps, a.guidance_scale, **at["balanced"])
    ident, grid = exp.identity(trained, a.prompts_per_concept)
    ident_bal, _ = exp.identity(balanced, a.prompts_per_concept)
    full, base = losses["full"], losses["both_off"]["own"]
    reduction = lambda pair, key: 1 - pair["own"][key] / pair["shuffled"][key]
    report = {
        "loss_own": full["own"]["mean"], "loss_shuffled": full["shuffled"]["mean"], "loss_base": base["mean"],
        "own_vs_shuffled_reduction": reduction(full, "mean"),
        "loss_own_object": full["own"]["object_mean"], "loss_shuffled_object": full["shuffled"]["object_mean"],
        "loss_base_object": base["object_mean"],
        "own_vs_shuffled_reduction_object": reduction(full, "object_mean"),
        "ablations": {setting: {"loss_own": pair["own"]["mean"], "loss_shuffled": pair["shuffled"]["mean"],
                                "own_vs_shuffled_reduction": reduction(pair, "mean"),
                                "own_vs_shuffled_reduction_object": reduction(pair, "object_mean")}
                      for setting, pair in losses.items()},
        "identity_own": ident["own"], "identity_shuffled": ident["shuffled"],
        "identity_gap": ident["gap"], "identity_gap_se": ident["gap_se"],  # own - shuffled, error over concepts
        "identity_concepts_own_above": ident["concepts_own_above"],
        "identity_balanced": {**at["balanced"], **ident_bal},
        "losses": losses,
        "settings": {"weights": a.weights, "data": a.data, "held_out_concepts": len(exp.concepts),
                     "samples": sum(map(len, exp.concepts.values())), "num_refs": a.num_refs,
                     "timesteps": a.timesteps, "sample_steps": a.sample_steps, "scheduler": a.scheduler, "guidance_scale": a.guidance_scale,
                     "identity_sampling": at["trained"], "seed": a.seed},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=1))
    save_image(grid, a.out / "grid.png")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
