# ControlNet data + training pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TASK ?= canny
comma := ,
# TASK=canny,hed,midas,openpose: one job writes every map, into data/canny-hed-midas-openpose by default
TASK_NAME = $(subst $(comma),-,$(TASK))
CONDITION ?=
SAMPLE_INPUT := data/sample/shards
INPUT ?= $(SAMPLE_INPUT)
OUTPUT ?= data/$(TASK_NAME)
CAPTION ?= source
WEIGHTS ?=
ARGS ?=
PRESET ?= debug
DATA ?= data/demo/canny
RUN ?= controlnet-$(PRESET)
DATASET ?= data/$(TASK_NAME)
# test processes (pytest-xdist), each with its own Ray session, a test file's tests in one of them: on 2 cores the
# suite's waits (Ray starting actors, runs stopping, outages ridden out) leave a serial run's CPUs ~30% idle
TEST_WORKERS ?= 2

CLUSTER ?= infra/aws/cluster.yaml
DASHBOARD ?= http://127.0.0.1:8265
IMAGE ?= ghcr.io/OWNER/controlnet-data:latest
GPUS ?= 16
STORAGE ?= s3://BUCKET/controlnet/runs
SIZES ?= 8,16,32
# .git stays behind (Ray uploads the working dir, skipping what .gitignore names: .venv, data/)
SUBMIT = $(VENV)/bin/ray job submit --address $(DASHBOARD) --working-dir . --runtime-env-json '{"excludes": [".git"]}' --
# the toy shapes: 32 px, Canny ranges that find the shapes' outlines only, lossless targets
TOY_CANNY = --resolution 32 --canny-low 80 120 --canny-high-gap 60 100 --jpeg-quality 100
BASE_ARGS ?=
# the demo trains briefly on the committed toy base: 16 samples at CFG 1 every 25 steps, and a higher learning
# rate than the preset's 1e-4, so that fidelity rises within ~200 steps (3 minutes here)
DEMO_TRAIN = --max-steps 200 --lr 3e-4 --validate-every 25 --checkpoint-every 100 --validation-samples 16 \
	--prompt-modes caption --guidance-scales 1
# make repro: the toy preset, stopped at 500 steps (its curve has levelled off by then) to fit 35 min here
REPRO_TRAIN ?= --max-steps 500
# make toy-sweep: three sizes a decade apart, 400 steps each, the primary curve only (~30 min here, measured before
# the sweep copied small sizes into shards of their own: the 300 subset, streamed from every shard, trained slower)
TOY_SIZES ?= 300,3k,30k
TOY_SWEEP_TRAIN ?= --max-steps 400 --validate-every 50 --prompt-modes caption --guidance-scales 1

TORCH_VERSION ?= 2.13.0+cpu
TORCH_WHEELS ?= /opt/wheels
UV_VERSION := 0.13.9

export RAY_USAGE_STATS_ENABLED ?= 0
export WANDB_MODE ?= offline
# uv installs no .pyc files: let the first import of each module write them (a machine-wide
# PYTHONDONTWRITEBYTECODE=1 would make every process compile its imports again)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help setup sample-data dataset demo train test lint bench preview subsets sweep cluster-up cluster-down \
	submit-dataset submit-train cluster-local image repro toy-sweep clean gpu-wheels gpu-check constraints tiny-weights

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	# one uv resolve + install (pip backtracks through ~2.6 GB of ray/botocore wheels here: 4-5 min against
	# 30-50 s); torch pinned to the local CPU wheel (PyPI has no +cpu build, so never the CUDA one); no
	# torchvision (it breaks transformers here); every version as constraints.txt says, the set the suite passed on.
	# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (this image sets it) no .pyc is ever written
	# otherwise, and every process (each test's driver, each Ray worker) compiled torch, Ray and diffusers from
	# source again: ~32 s of imports against ~11 s, 2.7x a trainer test's wall time
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) --find-links $(TORCH_WHEELS) -c constraints.txt \
		'torch==$(TORCH_VERSION)' -e '.[test]'
	touch $(STAMP)

constraints: $(STAMP) ## resolve pyproject.toml's ranges again (the newest releases) into constraints.txt; then make test
	{ printf '# what `make setup` installs: the newest releases in pyproject.toml'"'"'s ranges when `make constraints` last\n'; \
	  printf '# ran, the set the test suite passed on (an unpinned resolve once took an OpenCV that broke a parity test)\n'; \
	  printf 'torch==$(TORCH_VERSION)\n' | $(VENV)/bin/uv pip compile --python $(PY) pyproject.toml - --extra test \
		--find-links $(TORCH_WHEELS) --no-header --no-annotate -q; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

setup: $(STAMP) ## create .venv and install the project with its test tools

data/sample/shards/00000.tar: | $(STAMP)
	$(PY) -m pipeline.sample_data --output data/sample/shards

sample-data: data/sample/shards/00000.tar ## build input shards from the photos scikit-image ships

dataset: $(STAMP) $(if $(filter $(SAMPLE_INPUT),$(INPUT)),sample-data) ## build a dataset: make dataset TASK=canny (or canny,hed,midas,openpose) INPUT=... OUTPUT=... CAPTION=source WEIGHTS=...
	$(PY) -m pipeline.build --task $(TASK) --input '$(INPUT)' --output $(OUTPUT) --caption $(CAPTION) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

tiny-weights: $(STAMP) ## tiny random HED, OpenPose, MiDaS and BLIP weights in data/tiny-weights, to run the neural tasks offline (noise maps)
	$(PY) -m tests.tiny_weights data/tiny-weights

demo: $(STAMP) sample-data ## the main jobs on the embedded defaults: photos -> Canny dataset; toy shapes -> a ControlNet that visibly learns
	$(PY) -m pipeline.build --task canny --input data/sample/shards --output data/demo/canny
	$(PY) -m pipeline.preview data/demo/canny --out data/demo/canny-preview.png
	$(PY) -m pipeline.toy_shapes --output data/demo/toy-shapes --samples 2400 --num-shards 6 --seed 1
	$(PY) -m pipeline.build --task canny --input data/demo/toy-shapes --output data/demo/toy-canny $(TOY_CANNY)
	$(PY) train/run.py --preset toy --data data/demo/toy-canny --run-name demo --storage-path data/demo/runs \
		$(DEMO_TRAIN) $(ARGS)
	$(PY) -m train.export data/demo/runs/demo --format diffusers --out data/demo/controlnet

train: $(STAMP) ## train a ControlNet: make train PRESET=debug DATA=data/demo/canny RUN=name ARGS='--max-steps 100'
	$(PY) train/run.py --preset $(PRESET) --data $(DATA) --run-name $(RUN) $(ARGS)

preview: $(STAMP) ## contact sheet of a dataset: make preview DATASET=data/canny
	$(PY) -m pipeline.preview $(DATASET)

test: $(STAMP) ## run the test suite (real Ray, real tars, a moto S3 server on loopback)
	@# the project's own modules too (the editable install leaves them to the first import, which may not write
	@# them); a tree it cannot write to only runs slower
	-$(PY) -m compileall -q annotate pipeline train
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check annotate pipeline train tests bench

bench: $(STAMP) ## throughput benchmarks: prints tables, writes bench/results/*.json
	$(PY) -m bench.canny_throughput
	$(PY) -m bench.annotators
	$(PY) -m bench.multitask
	$(PY) -m bench.subsets_scale
	$(PY) -m bench.manifest_scale
	$(PY) -m bench.regroup_memory
	$(PY) -m bench.trainer_speed $(if $(PEER_SCRIPT),--peer-script $(PEER_SCRIPT))

# what the GPU check imports that a CUDA image with torch and transformers lacks (no Ray, W&B or tyro): pure-Python
# wheels at the versions this .venv runs (tests/test_gpu_check.py runs the check with everything else blocked)
GPU_WHEEL_PACKAGES := diffusers webdataset braceexpand
GPU_CHECK_OUT ?= bench/results/gpu_check

gpu-wheels: $(STAMP) ## download the wheels `make gpu-check` needs on an offline GPU machine into .whl/ (Python 3.12)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $(GPU_WHEEL_PACKAGES))
	@du -sh .whl

gpu-check: ## the GPU check (CUDA paths, SD 1.5 throughput, annotators, toy): see the README's Benchmarks
	PYTHONUNBUFFERED=1 $(or $(wildcard $(PY)),python3) -m bench.gpu_check --out $(GPU_CHECK_OUT) $(ARGS)

repro: $(STAMP) ## sudden convergence from scratch: shapes -> Canny dataset -> pixel base -> ControlNet (Ray Train) -> curve
	$(PY) -m pipeline.toy_shapes --output data/toy/shards --samples 6000 --num-shards 12
	$(PY) -m pipeline.build --task canny --input data/toy/shards --output data/toy/canny $(TOY_CANNY)
	$(PY) -m train.pretrain_base --data data/toy/canny --out data/toy/base $(BASE_ARGS)
	$(PY) train/run.py --preset toy --data data/toy/canny --base-model data/toy/base --run-name repro \
		--storage-path data/toy/runs $(REPRO_TRAIN) $(ARGS)

toy-sweep: $(STAMP) ## the dataset-size question on the toy: 30k shapes, one ControlNet per size, report
	$(PY) -m pipeline.toy_shapes --output data/toy30k/shards --samples 31000 --num-shards 31
	$(PY) -m pipeline.build --task canny --input data/toy30k/shards --output data/toy30k/canny $(TOY_CANNY)
	$(PY) train/sweep.py --dataset data/toy30k/canny --sizes $(TOY_SIZES) --preset toy --run-prefix toy-sizes \
		--storage-path data/toy30k/runs -- $(TOY_SWEEP_TRAIN) $(ARGS)

subsets: $(STAMP) ## nested subsets by resolution: make subsets DATASET=data/canny SIZES=1k,10k,50k
	$(PY) -m train.subsets --dataset $(DATASET) --sizes $(SIZES) $(if $(CONDITION),--condition $(CONDITION))

sweep: $(STAMP) ## dataset-size ablation: make sweep DATASET=data/demo/canny SIZES=8,16,32 PRESET=debug ARGS='--max-steps 20'
	$(PY) train/sweep.py --dataset $(DATASET) --sizes $(SIZES) --preset $(PRESET) --run-prefix sizes-$(or $(CONDITION),$(TASK_NAME)) \
		-- $(if $(CONDITION),--condition $(CONDITION)) $(ARGS)

cluster-up: $(STAMP) ## start the AWS Ray cluster (infra/aws/cluster.yaml; AWS credentials from your environment)
	$(VENV)/bin/ray up $(CLUSTER) -y

cluster-down: $(STAMP) ## terminate the AWS Ray cluster
	$(VENV)/bin/ray down $(CLUSTER) -y

submit-dataset: $(STAMP) ## dataset job on a cluster: make submit-dataset TASK=canny INPUT='s3://b/{00000..02999}.tar' OUTPUT=s3://b/canny
	$(SUBMIT) python -m pipeline.build --task $(TASK) --input '$(INPUT)' --output $(OUTPUT) --caption $(CAPTION) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

submit-train: $(STAMP) ## train on a cluster: make submit-train PRESET=sd15 DATA=s3://b/canny RUN=name GPUS=16 STORAGE=s3://b/runs
	$(SUBMIT) python train/run.py --preset $(PRESET) --data $(DATA) --run-name $(RUN) \
		--num-workers $(GPUS) --use-gpu True --storage-path $(STORAGE) $(ARGS)

cluster-local: $(STAMP) ## a real 2-node Ray cluster on this machine: dataset job + ray job submit DDP, S3 on loopback
	$(PY) -m pytest -q tests/test_cluster_local.py

image: ## build the cluster image (build context: the repository root)
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .

clean: ## remove generated data (keeps .venv)
	rm -rf data/demo data/canny data/toy data/toy30k bench/results
