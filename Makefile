# privrad: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.privrad-installed
DEMO   ?= runs/demo

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export PYTHONUNBUFFERED = 1

BUDGET ?= runs/budget

.PHONY: demo demo-he demo-pacs bench-service bench-fl bench-scale budget select test test-fast he-family lint install nginx orthanc clean

# (Re)install only when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# nginx from Debian, the reverse proxy in front of the SuperLink (docs/deployment.md); idempotent.
nginx:
	bash scripts/install-nginx.sh

# Orthanc + DICOMweb plugin (the hospital's PACS) and dicom3tools' dciodvfy from Debian (docs/pacs.md); idempotent.
orthanc:
	bash scripts/install-orthanc.sh

test: $(STAMP)
	$(PY) -m pytest -q

# Everyday loop: everything but the tests marked slow (real Flower runs, the HE service, sweeps).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The HE compiler's property test over 1,000 random models of the whole family (CI runs 200 smaller ones).
he-family: $(STAMP)
	PRIVRAD_FAMILY_EXAMPLES=1000 PRIVRAD_FAMILY_STAGES=3 PRIVRAD_FAMILY_CHANNELS=24 PRIVRAD_FAMILY_SIDES=16,48 $(PY) -m pytest -q \
		tests/he_inference/test_family.py --hypothesis-show-statistics

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Each demo is a new world: new synthetic hospitals, so fresh privacy ledgers (a site's ledger
# persists across runs on the same data: a second run would find the budget spent).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/privrad phantoms --out $(DEMO)/data --sites 5 --per-site 300 --size 64 --seed 0
	$(VENV)/bin/privrad train --data $(DEMO)/data --model ref --out $(DEMO)/ref
	$(VENV)/bin/privrad train --data $(DEMO)/data --model approx --out $(DEMO)/approx
	$(VENV)/bin/privrad simulate --data $(DEMO)/data --rounds 10 --delta 1e-5 --out $(DEMO)/federated
	$(VENV)/bin/privrad evaluate --model $(DEMO)/federated/global_model.pt --data $(DEMO)/data/test
	$(MAKE) --no-print-directory demo-he DEMO=$(DEMO)

# The PACS story (docs/pacs.md): a real Orthanc on loopback holds a phantom hospital; the hospital trains from it;
# two test instances are classified under HE and the results land in the same PACS as DICOM SRs. No PACS needed
# for `make demo`; this one installs Orthanc (Debian) if missing.
PACS_DEMO ?= runs/demo-pacs
demo-pacs: $(STAMP) orthanc
	rm -rf $(PACS_DEMO)
	$(VENV)/bin/privrad phantoms --out $(PACS_DEMO)/data --sites 1 --per-site 600 --test 100 --val 60 --public 200 --size 64 --seed 0
	$(VENV)/bin/privrad pacs demo --data $(PACS_DEMO)/data --out $(PACS_DEMO)/run

# The federated model serves one encrypted classification on loopback (needs the demo's run folder).
demo-he: $(STAMP)
	$(VENV)/bin/privrad he demo --run $(DEMO)/federated --data $(DEMO)/data --out $(DEMO)/he

# Load on the encrypted-inference service (64×64 Approx-CNN, random weights): 16 concurrent clients of
# 2 hospitals × 5 classifications; prints p50/p95 latency and the service's peak RSS. Several minutes.
bench-service: $(STAMP)
	$(VENV)/bin/privrad he load --size 64 --clients 16 --hospitals 2 --requests 5 --out runs/bench-service

# The federated benchmark at the Asan data set's scale (12,000 training slices over 5 hospitals of 800-4,000,
# a 1,000-slice shifted public archive, 1,000 val, 2,000 test): public start, local only, FedAvg, DP-SGD +
# SecAgg+ at ε 1/2/4/8, from scratch, centralised; 3 seeds; 5 rounds × 2 local epochs at batch 256 (chosen on val/:
# 0.957 against 0.956 at batch 32 and 0.955 at lr 1e-2, docs/federated-training.md). About 45 min per seed on 2 cores;
# rerun to resume. Then the from-scratch row again with the identity start (act-init, conv-gain; chosen on val/:
# 0.800 against 0.604 with the ReLU-fit start), into $(FL_BENCH)-scratch; and with the scattering front end and a
# linear classifier (scatter, channels; 40 rounds chosen on val/: 0.945-0.953), into $(FL_BENCH)-scatter (~5 min a seed),
# and every other row with that model into $(FL_BENCH)-scatter-all (~11 min a seed); last, every row with one
# 32-channel convolution stage on the features (20 rounds at batch 128, chosen on val/: docs/experiments/scatter_pub_tune.py)
# into $(FL_BENCH)-scatter-cnn; then the same model on the same hospitals with a 300-slice public archive
# ($(FL_DATA)-pub300, whose start keeps the aim of a public start <= 0.88) into $(FL_BENCH)-scatter-cnn-pub300, and
# again at lr 0.01 decayed by a cosine over the rounds (chosen on val/) into $(FL_BENCH)-scatter-cnn-pub300-cos.
FL_DATA ?= runs/asan
FL_BENCH ?= runs/bench-fl
ASAN_SITES = --sites 5 --site-sizes 4000,3000,2400,1800,800 --test 2000 --val 1000 --public-shift 0.5 --size 64 --seed 0
SCATTER_CNN = --rows public,local,fedavg,dp-eps-8,central --set num-server-rounds=20 --set local-epochs=2 --set batch-size=128 --set scatter=2 --set channels=32 --set augment=false
bench-fl: $(STAMP)
	test -f $(FL_DATA)/sites.json || $(VENV)/bin/privrad phantoms --out $(FL_DATA) --public 1000 $(ASAN_SITES)
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA) --out $(FL_BENCH) --set num-server-rounds=5 --set local-epochs=2 --set batch-size=256
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA) --out $(FL_BENCH)-scratch --rows scratch-eps-8 --set num-server-rounds=5 --set local-epochs=2 --set batch-size=256 --set act-init=identity --set conv-gain=2
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA) --out $(FL_BENCH)-scatter --rows scratch-eps-8 --set num-server-rounds=40 --set local-epochs=2 --set batch-size=256 --set scatter=2 --set channels= --set augment=false
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA) --out $(FL_BENCH)-scatter-all --rows public,local,fedavg,dp-eps-8,central --set num-server-rounds=40 --set local-epochs=2 --set batch-size=256 --set scatter=2 --set channels= --set augment=false
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA) --out $(FL_BENCH)-scatter-cnn $(SCATTER_CNN)
	test -f $(FL_DATA)-pub300/sites.json || $(VENV)/bin/privrad phantoms --out $(FL_DATA)-pub300 --public 300 $(ASAN_SITES)
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA)-pub300 --out $(FL_BENCH)-scatter-cnn-pub300 $(SCATTER_CNN)
	$(VENV)/bin/privrad benchmark federated --data $(FL_DATA)-pub300 --out $(FL_BENCH)-scatter-cnn-pub300-cos $(SCATTER_CNN) --set learning-rate=0.01 --set lr-schedule=cosine --set secagg-timeout=600

# Scaling of federated DP-SGD + SecAgg+ with the number of sites (20, 50, 100, 200; 3 rounds each, plus plain
# FedAvg as the baseline): scaling.json/.md/.png. Over an hour on 2 cores; rerun to resume.
SCALE ?= runs/bench-scale
bench-scale: $(STAMP)
	$(VENV)/bin/privrad benchmark scaling --out $(SCALE)

# Privacy-budget sweep (ε ∈ {1,2,4,8,∞} × 3 seeds, membership + inversion audits) and its report.
# About an hour on 2 cores; rerun to resume an interrupted sweep.
budget: $(STAMP)
	test -f $(BUDGET)/data/sites.json || $(VENV)/bin/privrad phantoms --out $(BUDGET)/data --sites 5 --per-site 300 --size 64 --seed 0
	$(VENV)/bin/privrad budget --data $(BUDGET)/data --out $(BUDGET)/sweep
	$(VENV)/bin/privrad report $(BUDGET)/sweep

# Choices (head, activation bound, learnable activation, learning rates, federated head) on the validation split.
SELECT ?= runs/select
select: $(STAMP)
	test -f $(SELECT)/data/sites.json || $(VENV)/bin/privrad phantoms --out $(SELECT)/data --sites 5 --per-site 300 --size 64 --seed 0
	$(VENV)/bin/privrad select --data $(SELECT)/data --out $(SELECT)/choices

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
