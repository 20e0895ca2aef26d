# Two set-up commands: `make train` and `make test`. Both create .venv and install what is missing.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
CONFIG   ?= conf/default.yaml
ARGS     ?=
DATA     ?= data/synthetic
RUN      ?= runs/default

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

# Synthetic object world shards (skipped when already there).
data: $(STAMP)
	$(BIN)/python -m data_tools.synthetic_world --output $(DATA)

# Trains with CONFIG; resumes from $(RUN)/checkpoints/last.ckpt when present.
train: data
	$(BIN)/ib fit --config $(CONFIG) --ckpt_path last $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

# Identity transfer in the synthetic world: toy base LDM -> InstantBooth on it (frozen) -> held-out measurement.
# Each stage resumes from its last checkpoint, so an interrupted run continues where it stopped.
experiment: $(STAMP)
	$(BIN)/python -m data_tools.synthetic_world --output data/toyworld --concepts 240 --val-concepts 24 --images-per-concept 8 --size 32
	$(BIN)/ib toy-base --config conf/toy_base.yaml --ckpt_path last
	$(BIN)/ib fit --config conf/toy_instantbooth.yaml --ckpt_path last
	$(BIN)/python -m ib.toy.experiment --weights runs/toy_instantbooth/checkpoints/last.ckpt --data data/toyworld/val --out runs/experiment

# Speed benchmark (random weights): tiny scale on CPU, SD 1.5 scale on a GPU; JSON into bench/results/.
#   make bench                                  # CPU, tiny
#   make bench ARGS="--scale sd15 --sweep"      # GPU, SD 1.5 shapes, each speed switch measured
bench: $(STAMP)
	$(BIN)/python bench/bench_speed.py $(ARGS)

# Loader throughput per CPU core at 512 px on the DreamBench photos (GrabCut masks); JSON in bench/results/.
bench-data: $(STAMP)
	$(BIN)/python bench/bench_data.py

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs --bind_all

clean:
	rm -rf runs data
