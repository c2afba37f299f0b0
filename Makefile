# One command each: `make setup`, `make demo`, `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := .imgclf/data/digits

.PHONY: setup demo test test-all lint lock clean browser engine

setup: $(STAMP)

$(STAMP): requirements/train.txt requirements/serve.txt requirements/dev.txt requirements/constraints.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements/dev.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps -e .
	touch $(STAMP)

DEMO_PORT ?= 8080

demo: setup
	$(VPY) launch.py data sample $(DEMO_DATA)
	$(VPY) launch.py data check $(DEMO_DATA)
	$(VPY) launch.py train --data $(DEMO_DATA) --job-name demo --hp arch=resnet18 pretrained=false \
		epochs=6 image_size=32 batch_size=64 lr=0.003 hflip=false
	@$(VPY) launch.py delete demo >/dev/null 2>&1 || true
	$(VPY) launch.py deploy --model .imgclf/jobs/demo/model --name demo --port $(DEMO_PORT)
	$(VPY) launch.py invoke --endpoint demo --topk 2 \
		$$(for d in $(DEMO_DATA)/test/00[1-4]*/; do ls $$d*.png | head -1; done); \
		status=$$?; $(VPY) launch.py delete demo; exit $$status

lint: setup
	$(VPY) -m ruff check src tests $(wildcard benchmarks) launch.py
	$(VPY) -m ruff format --check src tests $(wildcard benchmarks) launch.py
	$(VENV)/bin/hadolint docker/train/Dockerfile docker/serve/Dockerfile
	$(VENV)/bin/shellcheck build_and_push.sh docker/engine.sh

test: setup lint browser
	-@bash docker/engine.sh
	$(VPY) -m pytest

# A Docker engine for the image tests (tests/docker): the one at DOCKER_HOST or the default
# socket, else Debian's docker.io started on a private socket and data root under
# /var/lib/imgclf-docker (root and apt-get needed), with the base image debian:bookworm-slim made
# by debootstrap and kept. `make test` runs it best effort: without an engine the docker tests
# are skipped with one line.
engine:
	bash docker/engine.sh

# Headless Chromium checks that report.html renders (Debian's package; best effort: without it
# that one test is skipped).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "chromium is not installed (apt-get install chromium): the report screenshot test will be skipped"

test-all: setup lint browser
	-@bash docker/engine.sh
	$(VPY) -m pytest -m ''

lock: setup
	{ echo "# Full lock of every package the images and CI install (pip freeze of a working venv)."; \
	  echo "# Regenerate with: make lock"; \
	  $(VPY) -m pip freeze --exclude-editable; } > requirements/constraints.txt

clean:
	rm -rf .imgclf .pytest_cache .ruff_cache
