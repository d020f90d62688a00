# mrl-vision: set-up, tests, demo and benchmarks. Every target installs what it needs into .venv,
# system packages included (FFCV builds against libturbojpeg and OpenCV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MRL := $(VENV)/bin/mrl-vision
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -p no:cacheprovider
SYSTEM_PKGS := libturbojpeg0-dev libopencv-dev pkg-config
QS := data/quickstart

.PHONY: install system-deps test test-fast test-slow demo demo-torchvision results results-train bench clean \
	retrieval-demo retrieval-tiny results-2d tiny-compare tiny-compare-analysis tiny-compare-gpu results-supcon results-flowers embedding-compare

# FFCV's build needs these; installed with apt-get when missing (as root, or say what to run).
system-deps:
	@if command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg opencv4; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; \
	else echo "FFCV needs system packages: sudo apt-get install $(SYSTEM_PKGS)"; exit 1; fi

# The virtual environment with the package, FFCV and the test extras. torch comes from setup.cfg's
# requirement (on these machines pip takes torch 2.14.1 / torchvision 0.29.1 from local disk).
$(STAMP): setup.cfg pyproject.toml
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,ffcv]"
	touch $(STAMP)

install: $(STAMP)

# Everything: unit, CLI, FFCV, slow (multi-process, notebooks) tests. What the README and CI run.
test: $(STAMP)
	$(PYTEST) -q --durations=10

# The inner loop: skips tests marked slow.
test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

$(QS)/%.beton: | $(STAMP)
	$(MRL) prepare quickstart $@ --split $*

# Train MRL on the quickstart digits through FFCV (CPU, about 3 minutes), then print the per-size test table.
demo: $(STAMP) $(QS)/train.beton $(QS)/val.beton $(QS)/test.beton
	rm -rf runs/quickstart_ffcv/demo runs/quickstart_ffcv/demo-test
	$(MRL) fit --config configs/quickstart_ffcv.yaml --trainer.logger.init_args.version demo --trainer.enable_progress_bar false
	$(MRL) test --config configs/quickstart_ffcv.yaml --trainer.logger.init_args.version demo-test --trainer.enable_progress_bar false \
		--ckpt_path runs/quickstart_ffcv/demo/checkpoints/last.ckpt

# The same without FFCV: the in-memory quickstart data module (torchvision transforms).
demo-torchvision: $(STAMP)
	rm -rf runs/quickstart/demo runs/quickstart/demo-test
	$(MRL) fit --trainer.logger.init_args.version demo --trainer.enable_progress_bar false
	$(MRL) test --trainer.logger.init_args.version demo-test --trainer.enable_progress_bar false \
		--ckpt_path runs/quickstart/demo/checkpoints/last.ckpt

# The README's result: on the quickstart digits, MRL, MRL-E, FF at every size and a standard model
# (FF at the full width) cut down after training; then one report. About 20 minutes on 2 cores.
RESULTS := runs/results
FF_SIZES := 8 16 32 64 128 256 512
RUN = $(MRL) fit --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $(RESULTS) \
	--trainer.logger.init_args.name quickstart
TEST = $(MRL) test --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $(RESULTS) \
	--trainer.logger.init_args.name quickstart

results-train: $(STAMP)
	rm -rf $(RESULTS)
	for h in mrl mrl_e; do \
		$(RUN) --model.head $$h --trainer.logger.init_args.version $$h && \
		$(TEST) --ckpt_path $(RESULTS)/quickstart/$$h/checkpoints/last.ckpt --trainer.logger.init_args.version $$h-test \
		|| exit 1; done
	for m in $(FF_SIZES); do \
		$(RUN) --model.head ff --model.dims '[$$m]' --trainer.logger.init_args.version ff$$m && \
		$(TEST) --ckpt_path $(RESULTS)/quickstart/ff$$m/checkpoints/last.ckpt --trainer.logger.init_args.version ff$$m-test \
		|| exit 1; done

results: results-train
	$(MRL) truncate --ckpt_path $(RESULTS)/quickstart/ff512/checkpoints/last.ckpt --out $(RESULTS)/quickstart/truncated
	$(MRL) report $(RESULTS)/quickstart/*-test $(RESULTS)/quickstart/truncated --out $(RESULTS)/report

# The README's 2D Matryoshka result: on the quickstart digits, ViT-Tiny (32 px, 8 px patches) trained with 2D
# Matryoshka and with 1D MRL (seeds 0, 1, 2 each), and a standard ViT-Tiny (one seed) cut to 3, 6, 9 and 12
# blocks + linear probes; each tested, then the mean and spread table. About 90 minutes on 2 idle cores.
R2D := runs/results-2d/digits
CFG2D := --config configs/quickstart.yaml --config configs/model/mrl2d_vit_tiny.yaml --trainer.enable_progress_bar false \
	--trainer.logger.init_args.save_dir runs/results-2d --trainer.logger.init_args.name digits \
	--trainer.callbacks+=mrl_vision.callbacks.DepthWidthCascade --trainer.callbacks.every_n_epochs=24
results-2d: $(STAMP)
	rm -rf $(R2D)
	for run in "mrl2d 0 {}" "mrl2d 1 {}" "mrl2d 2 {}" "mrl1d 0 null" "mrl1d 1 null" "mrl1d 2 null"; do set -- $$run; \
		$(MRL) fit $(CFG2D) --seed_everything $$2 --model.matryoshka_2d "$$3" --trainer.logger.init_args.version $$1-s$$2 && \
		$(MRL) test $(CFG2D) --model.matryoshka_2d "$$3" --ckpt_path $(R2D)/$$1-s$$2/checkpoints/last.ckpt \
			--trainer.logger.init_args.version $$1-s$$2-test || exit 1; done
	$(MRL) fit $(CFG2D) --model.matryoshka_2d null --model.head ff --trainer.logger.init_args.version standard
	$(MRL) test $(CFG2D) --model.matryoshka_2d null --model.head ff --ckpt_path $(R2D)/standard/checkpoints/last.ckpt \
		--trainer.logger.init_args.version standard-test
	for k in 3 6 9 12; do $(MRL) truncate --layers $$k --ckpt_path $(R2D)/standard/checkpoints/last.ckpt \
		--out $(R2D)/standard-L$$k || exit 1; done
	$(PY) benchmarks/matryoshka_2d_results.py $(R2D)

# Retrieval on the quickstart digits: the demo-torchvision model's embeddings of the training split (database)
# and the test split (queries), every size, adaptive and funnel retrieval. About 4 minutes on 2 cores.
EMB := runs/embeddings
retrieval-demo: $(STAMP)
	test -f runs/quickstart/demo/checkpoints/last.ckpt || $(MAKE) demo-torchvision
	$(MRL) embed --ckpt_path runs/quickstart/demo --split train --out $(EMB)/quickstart-train --overwrite
	$(MRL) embed --ckpt_path runs/quickstart/demo --split test --out $(EMB)/quickstart-test --overwrite
	$(MRL) retrieve --database $(EMB)/quickstart-train --queries $(EMB)/quickstart-test \
		--adaptive 8:200:512 --adaptive 16:200:512 --funnel 16:800,32:400,64:200,128:50,512:10 --out runs/retrieval/quickstart

# The same on a Tiny-ImageNet-200 subset (100 classes x 100 training images, 32 px; data/tiny100 from
# benchmarks/tiny_subset.sh): trains ResNet-18 MRL (about 40 minutes on 2 cores), then embeds, retrieves and
# runs benchmarks/retrieval.py (accuracy, and queries/s up to 1M database vectors).
TINY := runs/tiny100/mrl
retrieval-tiny: $(STAMP)
	test -d data/tiny100/train || { echo "data/tiny100 missing: see benchmarks/tiny_subset.sh"; exit 1; }
	test -f $(TINY)/checkpoints/last.ckpt || $(MRL) fit --config configs/tinyimagenet/subset100_mrl_resnet18.yaml \
		--trainer.logger.init_args.version mrl --trainer.enable_progress_bar false
	$(MRL) embed --ckpt_path $(TINY) --split train --out $(EMB)/tiny100-train --overwrite
	$(MRL) embed --ckpt_path $(TINY) --split val --out $(EMB)/tiny100-val --overwrite
	$(MRL) retrieve --database $(EMB)/tiny100-train --queries $(EMB)/tiny100-val \
		--adaptive 8:200:512 --adaptive 16:200:512 --funnel 16:800,32:400,64:200,128:50,512:10 --out runs/retrieval/tiny100
	$(PY) benchmarks/retrieval.py --database $(EMB)/tiny100-train --queries $(EMB)/tiny100-val

# The Tiny-ImageNet comparison (issue 14), CPU reduced run: ResNet-18 at 32 px on 100 classes x 200 training
# images (configs/tinyimagenet/cpu_subset.yaml, 10 epochs): MRL, MRL-E, the standard model and FF-8 ... FF-128,
# each fitted and tested; linear probes (weight decay chosen on validation) on the standard model and on MRL;
# the cascade fitted on validation and scored on test; 1-NN / mAP@10 retrieval per size; one report.
# About 3 hours on 2 cores one model at a time (two at a time with OMP_NUM_THREADS=1: about 1.5 hours).
# Data: data/tiny100h-ffcv/{train,val,test}.beton (see the config's header). TC_RUNS picks a subset of models.
# TC_ARGS adds fit options (the longer run: TC=runs/tiny-compare-e30 TC_ARGS="--trainer.max_epochs 30");
# TC_CASCADE names the runs whose cascade is evaluated.
TC ?= runs/tiny-compare
TC_ARGS ?=
TC_CFG = --config configs/tinyimagenet/cpu_subset.yaml --trainer.logger.init_args.save_dir $(patsubst %/,%,$(dir $(TC))) \
	--trainer.logger.init_args.name $(notdir $(TC))
TC_RUNS ?= mrl:mrl:null mrl_e:mrl_e:null standard:ff:null ff8:ff:[8] ff16:ff:[16] ff32:ff:[32] ff64:ff:[64] ff128:ff:[128]
TC_CASCADE ?= mrl mrl_e
TC_PROBE := --weight-decay 0 1e-4 1e-3 1e-2 --select-split val --fit-split train --eval-split test
tiny-compare: $(STAMP)
	test -f data/tiny100h-ffcv/test.beton || { echo "data/tiny100h-ffcv missing: see configs/tinyimagenet/cpu_subset.yaml"; exit 1; }
	set -f; for run in $(TC_RUNS); do set -- $$(echo $$run | tr : ' '); name=$$1; head=$$2; dims=$$3; \
		test -f $(TC)/$$name/checkpoints/last.ckpt || $(MRL) fit $(TC_CFG) $(TC_ARGS) --model.head $$head --model.dims "$$dims" \
			--trainer.logger.init_args.version $$name || exit 1; \
		$(MRL) test $(TC_CFG) --ckpt_path $(TC)/$$name/checkpoints/last.ckpt --trainer.logger.init_args.version $$name-test \
			|| exit 1; done
	$(MAKE) tiny-compare-analysis TC=$(TC)

tiny-compare-analysis: $(STAMP)
	for name in standard mrl; do $(MRL) truncate --ckpt_path $(TC)/$$name $(TC_PROBE) --out $(TC)/$$name-probes || exit 1; done
	for name in $(TC_CASCADE); do $(PY) benchmarks/cascade_eval.py $(TC)/$$name --json $(TC)/$$name-cascade.json || exit 1; done
	for name in mrl standard; do for split in train test; do \
		$(MRL) embed --ckpt_path $(TC)/$$name --split $$split --out $(TC)/emb/$$name-$$split --overwrite || exit 1; done; \
		$(MRL) retrieve --database $(TC)/emb/$$name-train --queries $(TC)/emb/$$name-test --dims 8 16 32 64 128 256 512 \
			--out $(TC)/$$name-retrieval || exit 1; done
	$(MRL) report $(TC)/*-test $(TC)/*-probes $(TC)/*-retrieval --out $(TC)/report --title "Tiny-ImageNet subset (100 classes, 32 px)"
	$(PY) benchmarks/tiny_compare_table.py $(TC)

# The same comparison on all of Tiny-ImageNet-200 at 64 px with the full recipe (configs/tinyimagenet/recipe.yaml:
# RandAugment, random erasing, Mixup/CutMix, EMA; 100 epochs) on a GPU: ResNet-18 by default, TC_NET=resnet50.
TC_NET ?= resnet18
TCG := runs/tiny200-$(TC_NET)
tiny-compare-gpu: $(STAMP)
	test -f data/tiny200h-ffcv/test.beton || { echo "data/tiny200h-ffcv missing: see configs/tinyimagenet/recipe.yaml"; exit 1; }
	set -f; for run in mrl:mrl:null mrl_e:mrl_e:null standard:standard:null ff8:ff:[8] ff16:ff:[16] ff32:ff:[32] ff64:ff:[64]; do \
		set -- $$(echo $$run | tr : ' '); \
		cfg="--config configs/tinyimagenet/recipe.yaml --trainer.logger.init_args.name tiny200-$(TC_NET)"; \
		test -f $(TCG)/$$1/checkpoints/last.ckpt || $(MRL) fit $$cfg --config configs/tinyimagenet/$(TC_NET)_$$2.yaml \
			--model.dims $$3 --trainer.logger.init_args.version $$1 || exit 1; \
		$(MRL) test $$cfg --ckpt_path $(TCG)/$$1/checkpoints/last.ckpt --trainer.logger.init_args.version $$1-test || exit 1; done
	$(MAKE) tiny-compare-analysis TC=$(TCG)

# An embedding loss with Matryoshka (every size) against the same loss on the full 512 dims only, both fitted, tested
# (retrieval within the test split at every size), then benchmarks/embedding_compare_table.py. EC_CFG: the config,
# EC: its run folder (the logger's save_dir/name).
EC_CFG ?= configs/quickstart_supcon.yaml
EC ?= runs/results-supcon/quickstart_supcon
EC_ARGS = --config $(EC_CFG) --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $(patsubst %/,%,$(dir $(EC))) \
	--trainer.logger.init_args.name $(notdir $(EC))
embedding-compare: $(STAMP)
	rm -rf $(EC)
	for run in "mrl null" "plain [0,0,0,0,0,0,1]"; do set -- $$run; \
		$(MRL) fit $(EC_ARGS) --model.embedding_loss.weights "$$2" --trainer.logger.init_args.version $$1 && \
		$(MRL) test $(EC_ARGS) --ckpt_path $(EC)/$$1/checkpoints/last.ckpt --trainer.logger.init_args.version $$1-test \
			|| exit 1; done
	$(PY) benchmarks/embedding_compare_table.py $(EC)

# Matryoshka supervised contrastive learning on the quickstart digits (configs/quickstart_supcon.yaml, 2 views,
# 12 epochs). About 25 minutes on 2 cores.
results-supcon:
	$(MAKE) embedding-compare EC_CFG=configs/quickstart_supcon.yaml EC=runs/results-supcon/quickstart_supcon

# The deep-metric-learning protocol on Flowers-102 (configs/flowers/dml_supcon_resnet18.yaml: SupCon, 48 px, 15
# epochs; train on classes 1-51, Recall@K among the unseen 52-102). Data: see the config. About 1 hour on 2 cores.
results-flowers:
	test -d data/flowers-dml/test || { echo "data/flowers-dml missing: see configs/flowers/dml_supcon_resnet18.yaml"; exit 1; }
	$(MAKE) embedding-compare EC_CFG=configs/flowers/dml_supcon_resnet18.yaml EC=runs/flowers_dml

bench: $(STAMP)
	$(PY) benchmarks/head_overhead.py
	$(PY) benchmarks/loader_throughput.py

clean:
	rm -rf runs lightning_logs .pytest_cache
