IMAGES := e2e/cluster/images.sh
IMAGE_TAGS := slmpack/operator:0.1.0 slmpack/exporter:0.1.0 slmpack/engine-cpu:0.1.0 slmpack/prometheus:0.1.0

.PHONY: images images-import image-engine
images: system-deps protos ## build the project's images from images/ with buildah, cached as tars (no registry)
	$(IMAGES) base
	TARGET=operator $(IMAGES) build slmpack/operator:0.1.0 images/slmpack.Dockerfile .
	TARGET=exporter $(IMAGES) build slmpack/exporter:0.1.0 images/slmpack.Dockerfile .
	$(IMAGES) build slmpack/engine-cpu:0.1.0 images/engine-cpu.Dockerfile .
	$(IMAGES) build slmpack/prometheus:0.1.0 images/prometheus.Dockerfile images

images-import: ## load the built images into the local node's containerd
	for tag in $(IMAGE_TAGS); do $(IMAGES) import $$tag; done

image-engine: system-deps ## the CUDA engine image slmpack/engine:0.1.0 (vLLM from PyPI; ~10 GB, not part of `images`)
	$(IMAGES) base
	$(IMAGES) build slmpack/engine:0.1.0 images/engine.Dockerfile .
