.PHONY: crds
crds: ## regenerate crds/ and the chart's CRDs from the pydantic models
	PYTHONPATH=operator $(PYTHON) -m slmpack.cli crds --write crds charts/slmpack/crds
