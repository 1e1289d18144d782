# camserve: the two commands a newcomer needs are `make serve` and `make test` (see README.md).
CARGO ?= cargo

.PHONY: serve test ort build fixtures ops-test soak-test

# ONNX Runtime's shared library from the PyPI wheel (pip download; nothing else is fetched).
ort:
	scripts/fetch-ort.sh

build: ort
	$(CARGO) build --release --locked

# Serve the bundled demo model on 0.0.0.0:8080.
serve: build
	./target/release/camserve serve

# Everything CI runs: the Rust tests, then the demo page in headless Chromium (installed with apt-get as root),
# then one line counting what ran and what was skipped (scripts/test.sh).
test: ort
	scripts/test.sh

# The operational checks, in order, each failing on a missed goal (docs/OPERATIONS.md): replicas behind nginx
# under SIGKILL/SIGTERM, overload, the container image, then FUZZ_MINUTES (default 2) of fuzzing per target.
# Needs root for apt-get (nginx-light, podman) and a few minutes per step.
FUZZ_MINUTES ?= 2
ops-test: ort
	scripts/lb-test.sh
	scripts/flood-test.sh 60
	scripts/container-test.sh
	scripts/fuzz-long.sh $(FUZZ_MINUTES)

# 30 minutes of mixed traffic against ResNet-50 and the demo model (docs/OPERATIONS.md, "Soak").
soak-test: ort
	scripts/soak-test.sh 1800

# Regenerate the PyTorch reference fixtures (needs torch, torchvision, grad-cam: see tests/fixtures/README.md).
fixtures:
	python3 tests/fixtures/make_fixtures.py
