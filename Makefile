# The few commands people need. `make help` lists them.
.PHONY: help install test test-all lint format demo ui bench-gpu

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install the suite and its test tools (editable: Hydra reads conf/ from the checkout)
	python3 -m pip install -e '.[test]'

test:  ## the default tier (CI): fast tests plus NoProp-DT on real MNIST, about 10 min on 2 CPU cores
	python3 -m pytest -q

test-all:  ## every tier: also launcher multiruns, a live MLflow server, CT and FM on real MNIST
	python3 -m pytest -q -m ''

lint:  ## ruff lint and format check
	ruff check . && ruff format --check .

format:  ## apply ruff's fixes and formatting
	ruff check --fix . && ruff format .

demo:  ## a short real run: NoProp-DT on 10,000 MNIST images, 1 epoch, recorded in MLflow
	noprop-train dataset.train_size=10000 train.epochs=1

ui:  ## the MLflow UI on the runs recorded here (http://127.0.0.1:5000)
	mlflow ui --backend-store-uri sqlite:///mlflow.db

bench-gpu:  ## the README's GPU figures: dt, ct, fm, 60 s of training each (data: NOPROP_DATA_DIR, else ./data)
	python3 -m noprop_exp.bench --device cuda --variants dt,ct,fm --out results/bench-gpu --time-budget-s 60 \
		--override dt:variant.method.backward=per_block
