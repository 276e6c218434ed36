CLUSTER := e2e/cluster/cluster.sh
KUBECTL := $(SLMPACK_CACHE)/k8s-1.20.2/bin/kubectl --kubeconfig .cluster/kubeconfig

.PHONY: k8s-source k8s-binaries cluster-api cluster-up cluster-down cluster-status fake-gpu protos
k8s-source: system-deps ## fetch and unpack Debian's Kubernetes 1.20.2 source, once (the kubelet's protos)
	e2e/cluster/build-k8s.sh source

k8s-binaries: k8s-source ## build Kubernetes 1.20.2 from Debian's source, once (~9 min cold)
	e2e/cluster/build-k8s.sh

cluster-api: k8s-binaries ## the control plane alone on loopback (seconds)
	$(CLUSTER) api

cluster-up: k8s-binaries ## the control plane plus a Ready node; kubeconfig in .cluster/kubeconfig
	$(CLUSTER) up

cluster-down: ## stop the cluster and undo every host change it made
	$(CLUSTER) down

cluster-status:
	$(CLUSTER) status

protos: deps k8s-source ## compile the kubelet's device-plugin and PodResources protos into operator/slmpack/adapters/_kubelet
	PYTHONPATH=operator $(PYTHON) -m slmpack.adapters.kubelet_api

fake-gpu: ## (re)start the emulated NVIDIA device plugin with the SLMPACK_GPU* settings (e2e/cluster/README.md)
	PYTHON=$(PYTHON) $(CLUSTER) gpu
