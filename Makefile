# Two entry points: `make run` (set up, then generate a video on the built-in tiny model) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vidattn-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,train,demo]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/vidattn generate --model tiny --method radial --frames 65 --block-size 16 \
		--prompt "a red fox running through fresh snow" \
		--out outputs/tiny_radial.mp4 --overwrite

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
