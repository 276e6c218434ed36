.PHONY: demo e2e
e2e: deps k8s-binaries images helm ## the end-to-end scenario on the local real cluster (or $KUBECONFIG's)
	$(PYTHON) e2e/scenario.py

demo: e2e ## everything on a fresh Debian machine: cluster, images, chart, and the whole flow

.PHONY: autoscaling-ramp
autoscaling-ramp: deps k8s-binaries images helm ## slmpack's autoscaler vs an HPA, one vLLM CPU load ramp each (~45 min)
	$(PYTHON) benchmarks/autoscaling_ramp.py --steps 4:120,12:180,24:240,12:180,4:240
