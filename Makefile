.PHONY: check test lint format

check: lint test

lint:
	ruff check src tests benchmarks tools
	ruff format --check src tests
	mypy

format:
	ruff format src tests
	ruff check --fix src tests

test:
	python -m pytest -q
