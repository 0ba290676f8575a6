# The two commands of the README. Each creates .venv (Python >= 3.12) first when it is missing.
.PHONY: env demo test

env:
	@bash scripts/setup_env.sh

# Main job on its embedded default: a tiny Qwen3-VL MoE made locally, checked against transformers at TP2 x EP2.
demo: env
	@.venv/bin/python -m qwenvl_mcore.demo

# Whole test suite (unit + multi-rank gloo tests on the CPU).
test: env
	@.venv/bin/python -m pytest -q tests
