# Two entry points for a fresh machine (Python 3.11 + pip, no GPU needed): `make demo` and `make test`.
# Both create .venv on first use and install the pinned torch BEFORE the project, so the project's install
# never pulls another torch. Re-running is cheap: the install step is skipped while pyproject.toml is unchanged.
#
# TORCH_INDEX_URL: the index pip installs torch from (passed as --index-url, torch only). Empty (default): pip's
# own configuration, which on an ordinary Linux machine means PyPI's CUDA build. For the CPU build:
#   rm -rf .venv && make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH_INDEX_URL ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medseg-installed
DEMO   := demo

.PHONY: demo test lint clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=20

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/medseg synth cells --out $(DEMO)/cells --n 24 --n-test 4 --seed 0
	$(BIN)/medseg check $(DEMO)/cells
	$(BIN)/medseg train configs/demo_cells.yaml --resume auto
	$(BIN)/medseg predict --model runs/demo_cells --input $(DEMO)/cells/imagesTs --output $(DEMO)/pred --instances
	$(BIN)/medseg evaluate --pred $(DEMO)/pred --ref $(DEMO)/cells/labelsTs --instances
	@echo
	@echo "Open the runs in MLflow:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db   (then http://127.0.0.1:5000)"

clean-demo:
	rm -rf $(DEMO) runs mlflow.db mlruns
