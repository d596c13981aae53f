# vitexp: `make train` and `make test` install what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# tfswin declares numpy<2 but runs on numpy 2 (tests/models): installed without its pins
TFSWIN := tfswin==4.1.1
# the checkout on sys.path (compat): Hydra finds hydra_plugins/ and vitexp reads conf/ in place
EDITABLE := --config-settings editable_mode=compat
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml; echo $(TFSWIN) $(EDITABLE)) | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 5000
STORE ?= sqlite:///$(CURDIR)/mlflow.db
ARTIFACTS ?= $(CURDIR)/mlartifacts
ALLOWED_HOSTS ?=
CORS_ORIGINS ?=
ARGS ?=
MODEL ?= models:/vitexp-classifier/latest

.PHONY: install train test ui server serve sweep bench speedrun lint clean clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]' $(EDITABLE)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(TFSWIN)
	rm -f $(VENV)/.installed-* && touch $@

train: install  ## the textbook ViT on CIFAR-100 (add ARGS="model=vit patch_size=4 ...")
	$(PY) -m vitexp $(ARGS)

TEST_WORKERS ?= 2
test: install  ## the whole suite, end-to-end runs included, on TEST_WORKERS processes
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

ui: install  ## the MLflow UI over the project's store, on 127.0.0.1 only
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui \
	  --backend-store-uri $(STORE) --host $(HOST) --port $(PORT) --workers 1

server: install  ## a shared tracking server (STORE=postgresql://... for another SQL backend)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
	  --backend-store-uri $(STORE) --artifacts-destination $(ARTIFACTS) --host $(HOST) --port $(PORT) \
	  --workers 2 $(if $(ALLOWED_HOSTS),--allowed-hosts "$(ALLOWED_HOSTS)" --cors-allowed-origins "$(CORS_ORIGINS)")

serve: install  ## serve a registered model on 127.0.0.1:5001 (MODEL=models:/my-vit/1)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH MLFLOW_TRACKING_URI=$(STORE) $(VENV)/bin/mlflow models serve \
	  -m $(MODEL) --env-manager local -h $(HOST) -p 5001

sweep: install  ## an example patch-size x depth grid, grouped under one MLflow parent run
	$(PY) -m vitexp -m patch_size=4,6,8 depth=2,4 $(ARGS)

bench: install  ## training speed: textbook-style reference against vitexp
	$(PY) -m vitexp.bench $(ARGS)

lint: install
	$(VENV)/bin/ruff check vitexp tests

speedrun: install  ## time to 92% test top-1 on Fashion-MNIST, 3 seeds (ARGS="--target 0.93 ...")
	$(PY) -m vitexp.speedrun $(ARGS)

clean:  ## build and test outputs only; your runs stay (see clean-results)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache test-artifacts
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

RESULTS := mlflow.db mlruns mlartifacts outputs bench speedrun $(wildcard multirun/*)

clean-results:  ## deletes every recorded run: the MLflow store, checkpoints, run and sweep folders
	@echo "clean-results: deleting the experiment history in $(CURDIR):"
	@for p in $(RESULTS); do if [ -e "$$p" ]; then echo "  $$p"; fi; done
	rm -rf $(RESULTS)

.PHONY: slurm-up slurm-down

slurm-up:  ## a one-node Slurm cluster on this machine (root; apt-get install -y slurm-wlm munge)
	scripts/slurm-local.sh up

slurm-down:
	scripts/slurm-local.sh down
