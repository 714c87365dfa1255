# The book's three commands. Each one sets up the environment first if it is missing.
#   make book   execute every chapter (profile `small`) into build/book, regenerate figures/, summarise metrics
#   make test   unit tests, kernel checks, and every notebook in the `ci` profile (CI runs exactly this)
#   make lab    JupyterLab on 127.0.0.1 with a token, in the project's environment
#   make doctor what this machine can run: Python and package versions, kernel backends, CUDA C compilers
#   make browser  Debian's chromium for the real-browser test (`make test` asks for it; needs root and apt)
#   make stress   the thread, store, notebook-start and browser tests many times with both cores kept busy
#   make gpu-check  on a GPU machine: every CUDA kernel checked and timed, JSON under benchmarks/results/
#                   (make gpu-check-dry-run rehearses it anywhere, on numba's CUDA simulator)

PYTHON  ?= python3
VENV    := .venv
BIN     := $(CURDIR)/$(VENV)/bin
STAMP   := $(VENV)/.installed
PROFILE ?= small
PORT    ?= 8888

# Notebook kernels are started as `python` from PATH: make it the environment's.
export PATH := $(BIN):$(PATH)

.PHONY: book test lab env benchmark doctor browser stress gpu-check gpu-check-dry-run clean

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	@touch $@

book: $(STAMP)
	$(BIN)/python -m book --profile $(PROFILE)

test: $(STAMP) browser
	$(BIN)/python -m pytest

# Timing-sensitive tests under load: 50 runs of the thread/store tests, 10 of the notebook-start tests,
# 5 of the browser test (STRESS_ARGS to change, e.g. STRESS_ARGS="--browser-runs 1").
stress: $(STAMP) browser
	$(BIN)/python -m book.stress $(STRESS_ARGS)

# The browser test launches Debian's chromium by its path. Installed here when missing and we are root
# with apt; otherwise a line says so and the test skips (or fails under CI).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the real-browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
				|| echo "apt-get could not install chromium: tests/test_browser.py will skip (CI fails)"; \
		else \
			echo "chromium is missing and cannot be installed here (needs root and apt-get): tests/test_browser.py will skip"; \
		fi; }

# The token goes to the server in its environment (JUPYTER_TOKEN), never on its command line, where any local
# user could read it in the process list. As root it refuses unless ALLOW_ROOT=1 says so explicitly.
lab: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && [ "$(ALLOW_ROOT)" != 1 ]; then \
		echo "make lab: refusing to run notebooks as root; use an ordinary user, or ALLOW_ROOT=1 make lab"; exit 1; fi
	@token=$$($(BIN)/python -c "import secrets; print(secrets.token_hex(16))"); \
	echo "Open http://127.0.0.1:$(PORT)/lab?token=$$token"; \
	root_flag=$$([ "$$(id -u)" = 0 ] && echo --allow-root); \
	JUPYTER_TOKEN=$$token $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) \
		--KernelManager.transport=ipc --notebook-dir=notebooks $$root_flag

benchmark: $(STAMP)
	$(BIN)/python benchmarks/shared_blocks.py
	$(BIN)/python benchmarks/gated_delta_rule.py
	$(BIN)/python benchmarks/synapse.py
	$(BIN)/python benchmarks/henn.py
	$(BIN)/python benchmarks/geometric.py
	$(BIN)/python benchmarks/sintellix.py

doctor: $(STAMP)
	$(BIN)/python -m book.doctor

# On a GPU machine: the machine's own Python, torch, CuPy and numba-cuda (no venv); only the project is
# installed, without dependencies. Every kernel checked and timed, ceilings, the chapters; JSON under
# benchmarks/results/ (commit it). GPU_PYTHON to pick the interpreter; GPU_CHECK_ARGS, e.g. "--steps kernels".
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps -e .
	$(GPU_PYTHON) -m book.gpu_check $(GPU_CHECK_ARGS)

# The same script on any machine: numba's CUDA simulator, tiny sizes (tests/test_gpu_check.py runs it in CI).
gpu-check-dry-run: $(STAMP)
	$(BIN)/python -m book.gpu_check --dry-run $(GPU_CHECK_ARGS)

clean:
	rm -rf build .pytest_cache
