{{/* Names are cut to 63 characters, the limit of a DNS label. */}}
{{- define "slmpack.name" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slmpack.fullname" -}}
{{- if contains "slmpack" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-slmpack" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "slmpack.component" -}}
{{- printf "%s-%s" (include "slmpack.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slmpack.labels" -}}
app.kubernetes.io/name: slmpack
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "slmpack.selector" -}}
app.kubernetes.io/name: slmpack
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The ClusterRole the profiling Jobs run under; the operator binds it where it profiles.
Named by release, like every cluster-scoped object, so that two releases coexist. */}}
{{- define "slmpack.routerRole" -}}
{{- include "slmpack.component" (dict "root" . "component" "router") -}}
{{- end -}}

{{- define "slmpack.profilerRole" -}}
{{- include "slmpack.component" (dict "root" . "component" "profiler") -}}
{{- end -}}

{{- define "slmpack.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "slmpack.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* What the operator does in a watched namespace, and nothing more: tests/unit/test_chart.py
derives these verbs from the operator's code and fails when the two differ. Server-side apply
needs create and patch, and get to see whose an object is when another writer set its fields;
an ownerReference with blockOwnerDeletion needs update on the owner's finalizers. */}}
{{- define "slmpack.operatorRules" -}}
- apiGroups: [slmpack.dev]
  resources: [slmdeployments]
  verbs: [list, watch]
- apiGroups: [slmpack.dev]
  resources: [slmdeployments/status]
  verbs: [patch]
- apiGroups: [slmpack.dev]
  resources: [slmdeployments/finalizers, slmprofiles/finalizers]
  verbs: [update]
- apiGroups: [slmpack.dev]
  resources: [slmprofiles]
  verbs: [list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [list, watch, get, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, get, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, get, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, get, create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [create]
- apiGroups: [resource.k8s.io]
  resources: [resourceclaims]
  verbs: [list, create, delete]
- apiGroups: [resource.k8s.io]
  resources: [resourceclaimtemplates]
  verbs: [create]
# The router of each deployment (spec.routing.mode router): its Deployment, configuration, disruption budget,
# and the ServiceAccount and RoleBinding that let its agent read Endpoints.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, get, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [get, patch]
# spec.routing.mode inferencePool: the InferencePool over the replicas.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, create, patch]
{{- end -}}

{{/* An image reference: imageRegistry/repository, then @digest when set, :tag otherwise.
Call with (dict "root" $ "image" .Values.x.image). */}}
{{- define "slmpack.image" -}}
{{- $name := .image.repository -}}
{{- with .root.Values.imageRegistry }}{{ $name = printf "%s/%s" (trimSuffix "/" .) $name }}{{ end -}}
{{- if .image.digest -}}{{ printf "%s@%s" $name .image.digest }}{{- else -}}{{ printf "%s:%s" $name .image.tag }}{{- end -}}
{{- end -}}
