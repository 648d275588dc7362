# Two entry points a newcomer needs: `make demo` and `make test` (both set up first).
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench-emulated bench-deepspeed clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh scripts/setup_deepspeed.sh
	bash scripts/setup.sh

CORPUS ?= data/stdlib.bin

# The main job: pretrain a small Llama-style model (Hugging Face LlamaForCausalLM) on the
# interpreter's standard-library sources (byte level, built at setup), 4 CPU ranks
# (2 pipelines x 2 stages), warmup + cosine, clipping, bf16, validation every 20 steps;
# rank 3 is SIGKILLed during backward at step 30, the survivors recover in place and finish.
demo: setup
	rm -rf $(RUN_DIR)
	test -s $(CORPUS) || $(BIN)/odyssey prepare-data --stdlib --max-mb 8 --out $(CORPUS)
	$(BIN)/odyssey run --standalone --nproc-per-node 4 --run-dir $(RUN_DIR) \
	    examples/pretrain_llama.py --data $(CORPUS) --dp 2 --pp 2 --steps 80 --log-every 10 \
	    --eval-every 20 --checkpoint-every 40 --inject kill:rank=3,step=30,phase=backward
	$(BIN)/python -m odyssey.summary $(RUN_DIR)/report.json
	$(BIN)/odyssey report $(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench-emulated: setup
	$(BIN)/python benchmarks/emulated_step_time.py

bench-deepspeed: setup
	VENV=$(VENV) bash scripts/setup_deepspeed.sh
	$(BIN)/python benchmarks/engine_vs_deepspeed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
