"""Identity and prompt fidelity on held-out concepts at every validation: CLIP-I, CLIP-T and DINO, and the
colour identity of images generated with the concept's own references against another concept's.

The first `concepts` concepts of the validation shards × `prompts` × `images_per_prompt` are generated
with fixed seeds through InstantBoothPipeline (the path of `ib generate` and `ib evaluate`), from the
concept's masked object crops (served by the DataModule, or read from `shards`), and scored against the concept's full
images. With `shuffled`, each item is generated again, same prompt and seed, from the next concept's references:
val/identity_own above val/identity_shuffled means the references, not the prompt, carry the look.
Every rank generates its share of the items; the metrics sum their states over ranks.
"""
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ib.data.concepts import HeldOutConcept, read_held_out_concepts
from ib.data.shards import resolve_shards
from ib.errors import ConfigError
from ib.metrics.backbones import ClipBackboneConfig, DinoBackboneConfig
from ib.metrics.colour_identity import ColourIdentity
from ib.metrics.identity import identity_metrics
from ib.models.sampler import SamplingConfig, check_sampling
from ib.pipeline import InstantBoothPipeline, generate
from ib.ranges import PositiveInt, check_arguments

FIELD = "IdentityEval"


class IdentityEval(L.Callback):
    """
    prompts: templates with {identifier} and {class}, e.g. "a photo of a {identifier} {class} on the beach".
    concepts: how many held-out concepts (the first ones in the shards); references: photos per concept,
        used both as the model's references and as the real images the metrics compare with.
    images_per_prompt: images per concept × prompt; item k (in concept, prompt, image order) uses seed + k.
    sampling: overrides of the module's sampling settings (e.g. {steps: 4}); null: the module's.
    shards: the held-out shards; null: the DataModule's validation shards.
    clip / dino: the metric backbones (see ib.metrics.backbones).
    shuffled: also generate from the next concept's references (val/identity_shuffled, the grid's third column).
    grid_images: rows of the TensorBoard grid (from rank 0's share).
    """

    def __init__(self, prompts: list[str], concepts: PositiveInt = 2, references: PositiveInt = 3, images_per_prompt: PositiveInt = 1,
                 seed: int = 0, sampling: dict | None = None, shards: str | None = None,
                 clip: ClipBackboneConfig | None = None, dino: DinoBackboneConfig | None = None,
                 shuffled: bool = True, grid_images: PositiveInt = 8):
        check_arguments(IdentityEval, locals(), f"{FIELD}.")
        if not prompts:
            raise ConfigError(f"{FIELD}.prompts: empty")
        for p in prompts:
            if "{identifier}" not in p:
                raise ConfigError(f"{FIELD}.prompts: '{p}' has no {{identifier}}, so no concept would be injected")
            try:
                p.format(identifier="", **{"class": ""})
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"{FIELD}.prompts: '{p}': only {{identifier}} and {{class}} are filled in") from e
        self.prompts, self.num_concepts, self.references = list(prompts), concepts, references
        self.images_per_prompt, self.seed, self.grid_images = images_per_prompt, seed, grid_images
        self.shuffled = shuffled
        self.sampling_overrides = dict(sampling or {})
        unknown = set(self.sampling_overrides) - set(SamplingConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{FIELD}.sampling: unknown key {sorted(unknown)[0]}")
        # The values too, now rather than at the first validation.
        check_sampling(replace(SamplingConfig(), **self.sampling_overrides), None, lambda f: f"{FIELD}.sampling.{f}")
        self.shards = shards
        self.clip_cfg = clip or ClipBackboneConfig()
        self.dino_cfg = dino or DinoBackboneConfig()
        # Backbone files are checked at config time, before a run folder exists.
        clip_file = self.clip_cfg.pretrained
        if clip_file and (Path(clip_file).suffix or "/" in clip_file) and not Path(clip_file).is_file():
            raise ConfigError(f"{FIELD}.clip.pretrained: file not found: {clip_file}")
        if self.dino_cfg.weights and not Path(self.dino_cfg.weights).is_file():
            raise ConfigError(f"{FIELD}.dino.weights: file not found: {self.dino_cfg.weights}")
        self.metrics = None
        self.concepts: list[HeldOutConcept] | None = None

    # --- built once: the backbones when the run starts, the concepts at the first validation -----------
    def setup(self, trainer, pl_module, stage):
        if self.metrics is None and stage in ("fit", "validate"):
            self.metrics = identity_metrics(self.clip_cfg, self.dino_cfg, pl_module.model.identifier, FIELD)
            self.metrics["identity_own"] = ColourIdentity()
            if self.shuffled:
                self.metrics["identity_shuffled"] = ColourIdentity()

    def _load_concepts(self, trainer, pl_module) -> list[HeldOutConcept]:
        size = pl_module.model.image_encoder.image_size[0]
        if self.shards:
            urls = resolve_shards(self.shards, f"{FIELD}.shards")
            return read_held_out_concepts(urls, self.num_concepts, self.references, size, field=f"{FIELD}.shards")
        return trainer.datamodule.held_out_concepts(self.num_concepts, self.references, size)

    # --- every validation -----------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        model, device = pl_module.model, pl_module.device
        self.metrics = {k: m.to(device) for k, m in self.metrics.items()}
        if self.concepts is None:
            self.concepts = self._load_concepts(trainer, pl_module)
            if len(self.concepts) < self.num_concepts:
                rank_zero_info(f"{FIELD}: {self.num_concepts} concepts asked, the validation shards hold "
                               f"{len(self.concepts)}: scoring those")
        cfg = replace(pl_module.sampling, **self.sampling_overrides)
        shuffled = self.shuffled and len(self.concepts) > 1  # one concept has no other to borrow from
        items = [(c, template.format(identifier=model.identifier, **{"class": concept.class_noun}))
                 for c, concept in enumerate(self.concepts) for template in self.prompts
                 for _ in range(self.images_per_prompt)]
        mine = list(enumerate(items))[trainer.global_rank::trainer.world_size]
        grid = []
        pipe = InstantBoothPipeline.from_model(model, cfg.scheduler)
        for c, group in groupby(mine, key=lambda kv: kv[1][0]):
            group = list(group)
            concept, other = self.concepts[c], self.concepts[(c + 1) % len(self.concepts)]
            prompts, seeds = [prompt for _, (_, prompt) in group], [self.seed + k for k, _ in group]
            refs = concept.refs.to(device)[None].expand(len(group), *concept.refs.shape)
            images = generate(pipe, refs, prompts, cfg, seeds=seeds)
            reals = concept.reals.to(device)
            self.metrics["clip_i"].update(images, reals)
            self.metrics["dino"].update(images, reals)
            self.metrics["clip_t"].update(images, prompts)
            self.metrics["identity_own"].update(images, concept.object_pixels)
            columns = [concept.refs[:1].expand(len(group), -1, -1, -1), images.cpu()]
            if shuffled:
                other_refs = other.refs.to(device)[None].expand(len(group), *other.refs.shape)
                images_shuffled = generate(pipe, other_refs, prompts, cfg, seeds=seeds)
                self.metrics["identity_shuffled"].update(images_shuffled, concept.object_pixels)
                columns += [images_shuffled.cpu(), other.refs[:1].expand(len(group), -1, -1, -1)]
            size = images.shape[-2:]
            columns = [F.interpolate(col.float(), size=size, mode="bilinear", antialias=True) for col in columns]
            grid += list(torch.stack(columns, dim=1))  # one row per item

        for name, metric in self.metrics.items():
            if name == "identity_shuffled" and not shuffled:
                continue
            value = metric.compute()  # sums the states over ranks
            metric.reset()
            # Already equal on every rank; sync_dist only keeps Lightning's epoch-level bookkeeping uniform.
            pl_module.log(f"val/{name}", value.to(device), sync_dist=True)
        if trainer.is_global_zero and grid:
            rows = grid[:self.grid_images]
            image = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2)
            name = "val/reference_own_shuffled_other" if shuffled else "val/reference_generated"
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(name, image, trainer.global_step)
