# Two set-up commands: `make train` and `make test`. Both create .venv and install what is missing.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
CONFIG   ?= conf/default.yaml
ARGS     ?=
# RUN: the run folder (e.g. runs/mine); empty: CONFIG's trainer.default_root_dir.
# DATA: a folder of shards with train/ and val/ (data_tools.build_shards); empty: CONFIG's data.
RUN      ?=
DATA     ?=
SYNTHETIC := data/synthetic

# No machine of this project reaches a model hub; fail fast instead of retrying for a minute.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv train test test-fast bench bench-data data tensorboard experiment clean

venv: $(STAMP)

# torch/torchvision pinned to the builds on the machines' local disk (no 3 GB download).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Synthetic object world shards, the embedded default's data (skipped when already there).
data: $(STAMP)
	$(BIN)/python -m data_tools.synthetic_world --output $(SYNTHETIC)

# Trains CONFIG into the run folder RUN on the shards in DATA (the synthetic world when DATA is empty);
# resumes from RUN/checkpoints/last.ckpt when that run is there (ib refuses a folder of another run).
train: $(if $(DATA),$(STAMP),data)
	$(BIN)/ib fit --config $(CONFIG) $(if $(RUN),--trainer.default_root_dir $(RUN)) \
	  $(if $(DATA),--data.train_shards $(DATA)/train --data.val_shards $(DATA)/val) --ckpt_path last $(ARGS)

# Two test processes of one compute thread each (tests/conftest.py): one per core of a 2-core machine.
TEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) -m "not slow" $(ARGS)

# Identity transfer in the synthetic world: toy base LDM -> InstantBooth on it (frozen) -> held-out measurement.
# Each stage resumes from its last checkpoint, so an interrupted run continues where it stopped.
experiment: $(STAMP)
	$(BIN)/python -m data_tools.synthetic_world --output data/toyworld --concepts 240 --val-concepts 24 --images-per-concept 8 --size 32
	$(BIN)/python -m experiments.toy.cli --config conf/toy_base.yaml --ckpt_path last
	$(BIN)/ib fit --config conf/toy_instantbooth.yaml --ckpt_path last
	$(BIN)/python -m experiments.toy.experiment --weights runs/toy_instantbooth/checkpoints/last.ckpt --data data/toyworld/val --out runs/experiment

# Speed benchmark (random weights): tiny scale on CPU, SD 1.5 scale on a GPU; JSON into bench/results/.
#   make bench                                  # CPU, tiny
#   make bench ARGS="--scale sd15 --sweep"      # GPU, SD 1.5 shapes, each speed switch measured
bench: $(STAMP)
	$(BIN)/python bench/bench_speed.py $(ARGS)

# Loader throughput per CPU core at 512 px on the DreamBench photos (GrabCut masks); JSON in bench/results/.
bench-data: $(STAMP)
	$(BIN)/python bench/bench_data.py

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir $(or $(RUN),runs) --bind_all

clean:
	rm -rf runs data
