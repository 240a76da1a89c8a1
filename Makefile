# Two entry points: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create the virtual environment on first use: everything (torch CPU build, TotalSegmentator, vtk,
# slicer-core, ...) is resolved in ONE pip call against constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-model demo-model-ct node-model node-classifier station-model test lint lock clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lnstaging demo --out demo-out

# Reproduce the bundled demo model (LymphNodeStagingLib/resources/models/demo_ts1.pt): a 200-patient phantom
# cohort, TS1 with the small network and the hybrid head (SUVmax, SUVpeak, volume), calibrated on a held-out
# 100-patient cohort. About 15 min for the station maps, 5 min of training and 2 min of calibration on 2 CPU cores.
DEMO_ATLASES = $(shell $(BIN)/python -c "from LymphNodeStagingLib.paths import demo_atlas_set_path as p; print(p())")

demo-model: $(STAMP)
	$(BIN)/lnstaging phantom --demo-atlases
	$(BIN)/lnstaging phantom --out build/demo-cohort --patients 200 --seed 2026
	LNSTAGING_ATLASES=$(DEMO_ATLASES) $(BIN)/lnstaging train build/demo-cohort/cohort.csv --strategy ts1 --small --epochs 20 \
		--max-steps-per-epoch 40 --batch-size 32 --hybrid --lr 2e-3 \
		--seed 1 --out build/demo-model
	$(BIN)/lnstaging phantom --out build/calib-cohort --patients 100 --seed 2027
	LNSTAGING_ATLASES=$(DEMO_ATLASES) $(BIN)/lnstaging calibrate build/calib-cohort/cohort.csv --model build/demo-model/best.pt \
		--out build/demo-model/calibrated.pt
	cp build/demo-model/calibrated.pt LymphNodeStagingLib/resources/models/demo_ts1.pt
	sed 's/"calibrated.pt"/"demo_ts1.pt"/' build/demo-model/calibrated.json > LymphNodeStagingLib/resources/models/demo_ts1.json
	@echo "pin the new file: set BUNDLED_MODELS['demo_ts1.pt'] in LymphNodeStagingLib/paths.py to"
	@sha256sum LymphNodeStagingLib/resources/models/demo_ts1.pt

# Reproduce the bundled CT-only demo model (LymphNodeStagingLib/resources/models/demo_ts1_ct.pt), what `assess` uses
# for a CT without PET: the settings and cohorts of demo-model with the station classifier reading the CT alone
# (--modality ct, so no hybrid head), calibrated on the same held-out cohort. About as long as demo-model; the
# station maps of both cohorts are shared with it.
demo-model-ct: $(STAMP)
	$(BIN)/lnstaging phantom --demo-atlases
	$(BIN)/lnstaging phantom --out build/demo-cohort --patients 200 --seed 2026
	LNSTAGING_ATLASES=$(DEMO_ATLASES) $(BIN)/lnstaging train build/demo-cohort/cohort.csv --strategy ts1 --small --modality ct \
		--epochs 20 --max-steps-per-epoch 40 --batch-size 32 --lr 2e-3 --seed 1 --out build/demo-model-ct
	$(BIN)/lnstaging phantom --out build/calib-cohort --patients 100 --seed 2027
	LNSTAGING_ATLASES=$(DEMO_ATLASES) $(BIN)/lnstaging calibrate build/calib-cohort/cohort.csv --model build/demo-model-ct/best.pt \
		--out build/demo-model-ct/calibrated.pt
	cp build/demo-model-ct/calibrated.pt LymphNodeStagingLib/resources/models/demo_ts1_ct.pt
	sed 's/"calibrated.pt"/"demo_ts1_ct.pt"/' build/demo-model-ct/calibrated.json > LymphNodeStagingLib/resources/models/demo_ts1_ct.json
	@echo "pin the new file: set BUNDLED_MODELS['demo_ts1_ct.pt'] in LymphNodeStagingLib/paths.py to"
	@sha256sum LymphNodeStagingLib/resources/models/demo_ts1_ct.pt

# Reproduce the bundled node model (LymphNodeStagingLib/resources/models/nodes_demo.pt): the 3D U-Net at a quarter
# of the published width on a 40-patient phantom cohort (their nodes_path), 30 epochs of 32 batches. About 20 min
# on 2 CPU cores.
node-model: $(STAMP)
	$(BIN)/lnstaging phantom --out build/node-cohort --patients 40 --seed 301
	$(BIN)/lnstaging train-nodes build/node-cohort/cohort.csv --arch unet3d --width 0.25 --min-inplane 64 \
		--epochs 30 --max-steps-per-epoch 32 --seed 1 --threads 1 --out build/node-model
	cp build/node-model/best.pt LymphNodeStagingLib/resources/models/nodes_demo.pt
	sed 's/"best.pt"/"nodes_demo.pt"/' build/node-model/best.json > LymphNodeStagingLib/resources/models/nodes_demo.json
	@echo "pin the new file: set BUNDLED_MODELS['nodes_demo.pt'] in LymphNodeStagingLib/paths.py to"
	@sha256sum LymphNodeStagingLib/resources/models/nodes_demo.pt

# Reproduce the bundled node classifiers (node_classifier_demo.pt for PET/CT, node_classifier_ct_demo.pt for the CT
# alone): trained from the station labels of the 200-patient demo cohort (the nodes found by the bundled node model),
# 12 epochs each. About 25 min each on 2 busy CPU cores.
node-classifier: $(STAMP)
	$(BIN)/lnstaging phantom --demo-atlases
	$(BIN)/lnstaging phantom --out build/demo-cohort --patients 200 --seed 2026
	for m in petct ct; do \
		LNSTAGING_ATLASES=$(DEMO_ATLASES) $(BIN)/lnstaging train-node-classifier build/demo-cohort/cohort.csv \
			--modality $$m --epochs 12 --seed 1 --threads 1 --out build/node-classifier-$$m || exit 1; \
	done
	cp build/node-classifier-petct/best.pt LymphNodeStagingLib/resources/models/node_classifier_demo.pt
	sed 's/"best.pt"/"node_classifier_demo.pt"/' build/node-classifier-petct/best.json \
		> LymphNodeStagingLib/resources/models/node_classifier_demo.json
	cp build/node-classifier-ct/best.pt LymphNodeStagingLib/resources/models/node_classifier_ct_demo.pt
	sed 's/"best.pt"/"node_classifier_ct_demo.pt"/' build/node-classifier-ct/best.json \
		> LymphNodeStagingLib/resources/models/node_classifier_ct_demo.json
	@echo "pin the new files: set BUNDLED_MODELS['node_classifier_demo.pt'] and ['node_classifier_ct_demo.pt'] in"
	@echo "LymphNodeStagingLib/paths.py to"
	@sha256sum LymphNodeStagingLib/resources/models/node_classifier_*demo.pt

# Reproduce the bundled station network (LymphNodeStagingLib/resources/models/stations_net.pt): a 40-patient
# full-size phantom cohort (seed 1801), the two-head station U-Net trained on its true station maps, 30 epochs on
# one CPU thread. About 4 min for the cohort and 10 min of training on a 2-core CPU.
station-model: $(STAMP)
	$(BIN)/lnstaging phantom --out build/station-cohort --patients 40 --seed 1801 --size full
	$(BIN)/lnstaging train-stations build/station-cohort/cohort.csv --labels truth --epochs 30 --seed 0 --threads 1 \
		--out build/station-model
	cp build/station-model/best.pt LymphNodeStagingLib/resources/models/stations_net.pt
	sed 's/"best.pt"/"stations_net.pt"/' build/station-model/best.json > LymphNodeStagingLib/resources/models/stations_net.json
	@echo "pin the new file: set BUNDLED_MODELS['stations_net.pt'] in LymphNodeStagingLib/paths.py to"
	@sha256sum LymphNodeStagingLib/resources/models/stations_net.pt

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-resolve the pinned set (needs network access to PyPI).
lock:
	rm -rf /tmp/lns-lock && $(PYTHON) -m venv /tmp/lns-lock
	/tmp/lns-lock/bin/python -m pip install --quiet --upgrade "pip>=24"
	/tmp/lns-lock/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	(echo "# Exact versions resolved together (one pip call); regenerate with \`make lock\`."; echo "torch==2.13.0"; \
	 /tmp/lns-lock/bin/python -m pip freeze | grep -v -iE "^(torch|pip|setuptools)==") > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
