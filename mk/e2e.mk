.PHONY: demo e2e
e2e: deps k8s-binaries images helm ## the end-to-end scenario on the local real cluster (or $KUBECONFIG's)
	$(PYTHON) e2e/scenario.py

demo: e2e ## everything on a fresh Debian machine: cluster, images, chart, and the whole flow
