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

.PHONY: venv train test test-fast bench bench-data data tensorboard experiment toy-base clean

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
# worksteal: the slow tests are collected first (tests/conftest.py) and an idle process takes half of the
# other's queue, so no long test is left to run alone at the end.
TEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal -m "not slow" $(ARGS)

# Identity transfer in the synthetic world: the embedded default trained longer (conf/experiment.yaml) on the
# stored toy base, then measured on the held-out concepts; SEED picks the run (runs/experiment-seedSEED).
# One compute thread: the numbers are then the same on any machine and under any load (float sums keep
# their order). Each stage resumes from its last checkpoint.
SEED ?= 0
EXPERIMENT := runs/experiment-seed$(SEED)
experiment: data
	OMP_NUM_THREADS=1 $(BIN)/ib fit --config conf/default.yaml --config conf/experiment.yaml \
	  --trainer.default_root_dir $(EXPERIMENT) --seed_everything $(SEED) --data.loader.seed $(SEED) --ckpt_path last
	OMP_NUM_THREADS=1 $(BIN)/python -m experiments.toy.experiment --weights $(EXPERIMENT)/checkpoints/last.ckpt \
	  --data $(SYNTHETIC)/val --out $(EXPERIMENT)/report

# Rebuilds assets/toy-base, the embedded default's frozen base, from the synthetic world's training concepts.
toy-base: data
	$(BIN)/python -m experiments.toy.cli --config conf/toy_base.yaml --ckpt_path last

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
