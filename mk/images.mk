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

image-engine: system-deps ## the CUDA engine image slmpack/engine:0.1.0 (vLLM from PyPI; ~9 GB, not part of `images`, no tar)
	@# Its 8 GB layer is written twice while buildah commits it; a full disk would evict the node's pods.
	@free=$$(df --output=avail -BG /var/lib/containers 2>/dev/null | tail -1 | tr -dc 0-9); \
	if [ "$${free:-0}" -lt 40 ]; then echo "image-engine needs 40 GB free disk, $${free:-0} GB are"; exit 1; fi
	$(IMAGES) base
	$(IMAGES) build slmpack/engine:0.1.0 images/engine.Dockerfile . --no-archive
