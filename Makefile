# Two entry points for a fresh machine (Python 3.11 + pip, no GPU): `make demo` and `make test`.
# Both create .venv on first use and install the pinned CPU torch BEFORE the project, so pip never pulls a
# newer torch with several GB of CUDA packages. Re-running is cheap: the install step is skipped while
# pyproject.toml is unchanged.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medseg-installed
DEMO   := demo

.PHONY: demo test lint clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
