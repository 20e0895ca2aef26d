"""The stored toy base (assets/toy-base): it loads through `model.ldm.pretrained`, agrees with the synthetic
world, never saw the held-out concepts, and the trainer that made it still makes one."""
import json

import pytest
import torch
import yaml

from data_tools.synthetic_world import TEXTURE_WORDS, build
from data_tools.synthetic_world import main as build_world
from experiments.toy.cli import main as toy_base_main
from experiments.toy.vocabulary import WORLD_TEXTS, prune_vocabulary, world_texts
from ib.models.frozen_ldm import FrozenLDM, LDMConfig
from tests.conftest import ROOT, default_config, random_parts

BASE = ROOT / "assets" / "toy-base"


def test_the_default_config_loads_the_stored_base_in_float32():
    assert default_config()["model"]["ldm"]["pretrained"] == "assets/toy-base"
    ldm = FrozenLDM.from_config(LDMConfig(pretrained=str(BASE)))
    assert {p.dtype for p in ldm.parameters()} == {torch.float32} and not any(p.requires_grad for p in ldm.parameters())
    assert ldm.image_size == default_config()["data"]["image_size"] == 32
    assert ldm.unet.config.cross_attention_dim == ldm.text_encoder.config.hidden_size


def test_the_base_was_trained_on_the_default_worlds_training_concepts_only(tmp_path):
    record = json.loads((BASE / "record.json").read_text())
    assert {"command", "seed", "commit", "steps", "world"} <= set(record)
    build_world(["--output", str(tmp_path / "world")])  # the default world, as `make data` builds it
    manifest = json.loads((tmp_path / "world" / "manifest.json").read_text())
    assert record["world"] == manifest["settings"] and record["train_shards"].endswith("/train")
    concepts = json.loads((tmp_path / "world" / "concepts.json").read_text())
    train = {c["concept"] for c in concepts[:manifest["settings"]["concepts"]]}
    held_out = {c["concept"] for c in concepts[manifest["settings"]["concepts"]:]}
    assert len(held_out) == 24 and not train & held_out
    # Rebuilding it is documented where a user looks: the Makefile target and the folder's README.
    assert record["command"].startswith("python -m experiments.toy.cli --config conf/toy_base.yaml")
    assert "python -m experiments.toy.cli --config conf/toy_base.yaml" in (ROOT / "Makefile").read_text()
    assert "make toy-base" in (ROOT / "assets" / "README.md").read_text()


def test_the_base_trainer_writes_a_loadable_bf16_base_with_its_record(tmp_path, monkeypatch):
    # The record names the commit the training ran on: taken at launch, not after an hour of training, when the
    # working tree may hold edits or a new commit.
    import experiments.toy.cli as toy_cli
    from experiments.toy.base_module import ToyBaseModule
    trained = []
    monkeypatch.setattr(ToyBaseModule, "on_fit_end", lambda self: trained.append(True), raising=False)
    monkeypatch.setattr(toy_cli, "_commit", lambda: "after training" if trained else "at launch")
    world = build(tmp_path / "world", concepts=6, val_concepts=2, images_per_concept=2, size=32, shard_size=8, seed=0)
    cfg = yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=4, val_check_interval=2,
                          limit_val_batches=1)
    cfg["checkpoint"]["every_n_train_steps"] = 2
    cfg["model"].update(output_dir=str(tmp_path / "base"), vae_steps=2, concepts_file=str(world / "concepts.json"))
    cfg["data"].update(train_shards=str(world / "train"), val_shards=str(world / "val"), batch_size=2,
                       batches_per_epoch=2, val_batches=1)
    cfg["data"]["loader"]["num_workers"] = 0
    (tmp_path / "toy_base.yaml").write_text(yaml.safe_dump(cfg))
    assert toy_base_main(["--config", str(tmp_path / "toy_base.yaml")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    record = json.loads((tmp_path / "base" / "record.json").read_text())
    assert record["steps"] == 4 and record["seed"] == 0 and record["world"]["concepts"] == 6
    assert trained and record["commit"] == "at launch"
    ldm = FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "base")))
    assert ldm.vae.config.scaling_factor > 0 and ldm.image_size == 32
    assert len(ldm.tokenizer) == ldm.text_encoder.config.vocab_size == record["vocabulary"]["tokens"] < 1000


def test_the_base_reads_captions_with_the_identifier_as_instantbooth_writes_them():
    """InstantBooth's prompts hold the identifier before the noun; the base reads that form for a share
    (model.identifier_prob) of its captions, the stripped form for the rest, and the empty prompt for dropout."""
    from experiments.toy.base_module import ToyBaseModule
    cfg = yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())["model"]
    assert 0 < cfg["identifier_prob"] < 1
    caption = "a photo of a sks ball on the beach"
    prompts = {}
    for p in (0.0, cfg["identifier_prob"], 1.0):
        module = ToyBaseModule(LDMConfig(**cfg["ldm"]), "unused", caption_dropout=0.1, identifier_prob=p)
        torch.manual_seed(0)
        prompts[p] = [module._prompt(caption, "ball_000") for _ in range(1000)]
    assert set(prompts[0.0]) == {"", "a photo of a ball on the beach"}
    assert set(prompts[1.0]) == {"", caption}
    share = prompts[cfg["identifier_prob"]].count(caption) / 900  # of the ~900 not dropped
    assert abs(share - cfg["identifier_prob"]) < 0.06 and 60 < prompts[1.0].count("") < 140


def test_the_base_reads_a_share_of_captions_with_the_concepts_look_in_words(tmp_path):
    """model.description_prob of the captions name the concept's look (data_tools.synthetic_world.describe) where
    InstantBooth puts the identifier; the rest are as above. Without the world's concepts.json: a one-line error."""
    from experiments.toy.base_module import ToyBaseModule
    cfg = yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())["model"]
    assert 0 < cfg["description_prob"] < 1
    world = build(tmp_path / "world", concepts=6, val_concepts=2, images_per_concept=1, size=32, shard_size=8, seed=0)
    spec = json.loads((world / "concepts.json").read_text())[0]
    assert spec["texture"] != "solid"  # seed 0: the look names both colours and the texture
    look = f"{spec['colours'][0]} and {spec['colours'][1]} "
    caption = f"a photo of a sks {spec['class']} on the beach"
    module = ToyBaseModule(LDMConfig(**cfg["ldm"]), "unused", caption_dropout=0.1, identifier_prob=1.0,
                           description_prob=cfg["description_prob"], concepts_file=str(world / "concepts.json"))
    torch.manual_seed(0)
    prompts = [module._prompt(caption, spec["concept"]) for _ in range(1000)]
    described = [p for p in prompts if p not in ("", caption)]
    assert set(described) == {f"a photo of a {look}{TEXTURE_WORDS[spec['texture']]} {spec['class']} on the beach"}
    assert abs(len(described) / 900 - cfg["description_prob"]) < 0.06
    with pytest.raises(ValueError, match="model.concepts_file: .* concepts.json"):
        ToyBaseModule(LDMConfig(**cfg["ldm"]), "unused", description_prob=0.3, concepts_file=str(tmp_path / "none.json"))


def test_a_base_run_that_never_reached_the_unet_phase_says_so_and_writes_nothing(tmp_path):
    world = build(tmp_path / "world", concepts=6, val_concepts=2, images_per_concept=2, size=32, shard_size=8, seed=0)
    cfg = yaml.safe_load((ROOT / "conf" / "toy_base.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=2, limit_val_batches=0)
    cfg["model"].update(output_dir=str(tmp_path / "base"), vae_steps=2, concepts_file=str(world / "concepts.json"))
    cfg["data"].update(train_shards=str(world / "train"), val_shards=str(world / "val"), batch_size=2,
                       batches_per_epoch=2)
    cfg["data"]["loader"]["num_workers"] = 0
    (tmp_path / "toy_base.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="the UNet phase never started"):
        toy_base_main(["--config", str(tmp_path / "toy_base.yaml")])
    assert not (tmp_path / "base").exists()


def _text_states(ldm, texts):
    ids = ldm.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ldm.encode_text([ids])


def test_the_cut_vocabulary_gives_the_same_text_states_on_the_worlds_words(tmp_path):
    """The toy base keeps the tokens of the world's captions only: on them the text encoder's states are exactly
    the full vocabulary's; other words still tokenize (into smaller pieces); saved and loaded back, the same."""
    torch.manual_seed(0)
    full = FrozenLDM.from_config(LDMConfig(**random_parts()))
    texts = world_texts("sks") + ["", "a photo of a sks ball on the beach"]
    before = _text_states(full, texts)
    size = prune_vocabulary(full, texts)
    assert 512 < size == len(full.tokenizer) == full.text_encoder.config.vocab_size < 1000
    assert torch.equal(_text_states(full, texts), before)
    assert full.tokenizer.tokenize("a dog on the moon")[-2:] == ["o", "on</w>"]  # "moon": out of the vocabulary
    full.save_pretrained(tmp_path / "base")
    loaded = FrozenLDM.from_config(LDMConfig(pretrained=str(tmp_path / "base")))
    assert torch.equal(_text_states(loaded, texts), before)


def test_the_stored_base_holds_the_cut_vocabulary():
    record = json.loads((BASE / "record.json").read_text())
    assert record["vocabulary"]["texts"] == WORLD_TEXTS  # cut by the trainer that made it (save_base)
    ldm = FrozenLDM.from_config(LDMConfig(pretrained=str(BASE)))
    assert len(ldm.tokenizer) == record["vocabulary"]["tokens"] < 1000
    vocabulary = ldm.tokenizer.get_vocab()
    assert prune_vocabulary(ldm, world_texts(record["hparams"]["identifier"])) == len(vocabulary)  # nothing to cut
    assert ldm.tokenizer.get_vocab() == vocabulary


def test_the_stored_base_reads_the_word_in_the_identifiers_place():
    """The concept token replaces the text state at V̂'s position, so the frozen base must read that position, as
    SD's UNet reads its words: swapping that one state ('blue' for 'red') moves the UNet's prediction. (A base on
    a random 2-layer causal text encoder read the padding states, which summarise the prompt; the same swap moved
    its prediction by 0.1 %, and InstantBooth's concept token carried nothing.)"""
    ldm = FrozenLDM.from_config(LDMConfig(pretrained=str(BASE)))
    red, blue = (_text_states(ldm, [f"a photo of a {w} ball on the grass"]) for w in ("red", "blue"))
    position = ldm.tokenizer.tokenize("a photo of a red ball").index("red</w>") + 1  # after <|startoftext|>
    swapped = red.clone()
    swapped[:, position] = blue[:, position]
    torch.manual_seed(0)
    latents, t = torch.randn(8, 4, 8, 8), torch.full((8,), 700)
    with torch.no_grad():
        predict = lambda states: ldm.unet(latents, t, encoder_hidden_states=states.expand(8, -1, -1)).sample
        before, after = predict(red), predict(swapped)
    assert (after - before).norm() / before.norm() > 0.01
