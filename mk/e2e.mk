.PHONY: demo demo-down e2e
e2e: setup ## the end-to-end scenario on the local real cluster (or $KUBECONFIG's), cleaned up after
	$(PYTHON) e2e/scenario.py

demo: setup ## everything on a fresh Debian machine: cluster, images, chart, the whole flow, left serving
	$(PYTHON) e2e/scenario.py --keep

DEMO_LEFT := .cluster/demo-left
demo-down: ## remove what `make demo` left: its Prometheus, the deployment, the chart and the local cluster
	@if [ -f $(DEMO_LEFT) ]; then \
	  pid=$$($(PYTHON) -c 'import json; print(json.load(open("$(DEMO_LEFT)"))["prometheus_pid"])'); \
	  kill $$pid 2>/dev/null || true; \
	  $(KUBECTL) delete slmd --all -n demo --wait=true --timeout=120s 2>/dev/null || true; \
	  $(HELM) uninstall slmpack --namespace slmpack-system --wait --timeout 3m 2>/dev/null || true; \
	  rm -f $(DEMO_LEFT); \
	fi
	$(MAKE) -s cluster-down
	@# The cluster keeps its objects in etcd across a restart: an operator the uninstall missed would come back
	@# with the next cluster and act in every namespace beside the tests' own.
	rm -rf .cluster/etcd

.PHONY: autoscaling-ramp
autoscaling-ramp: deps k8s-binaries images helm ## slmpack's autoscaler vs an HPA, one vLLM CPU load ramp each (~45 min)
	$(PYTHON) benchmarks/autoscaling_ramp.py --steps 4:120,12:180,24:240,12:180,4:240
