# The two commands of the README. Each creates .venv (Python >= 3.12) first when it is missing.
.PHONY: env demo test

env:
	@bash scripts/setup_env.sh

# Main job on its embedded default: tiny Qwen3-VL MoE + sample data made locally, convert, train at TP2 x EP2 on
# 4 CPU ranks (launch/local.sh), export to HF, generate in transformers, summary.
demo: env
	@.venv/bin/python -m qwenvl_mcore.demo

# Whole test suite (unit + multi-rank gloo tests on the CPU).
test: env
	@bash tests/slurm/ensure_slurm.sh
	@.venv/bin/python -m pytest -q --durations=25 tests
