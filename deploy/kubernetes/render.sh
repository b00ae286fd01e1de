#!/bin/sh
# Prints the plain manifests: a namespace, then the Helm chart rendered with its default
# values. From the repository root:
#
#   deploy/kubernetes/render.sh > deploy/kubernetes/resil.yaml
#
# HELM names the helm binary (default: helm on PATH; `cargo xtask setup` installs one under
# $CARGO_HOME/resil-tools/venv/bin). tests/tests/deploy.rs checks resil.yaml is this output.
set -eu
cd "$(dirname "$0")/../.."
cat <<'HEAD'
# resil as a DaemonSet in namespace resil, for `kubectl apply -f`. Generated from the chart in
# deploy/helm/resil with its default values: do not edit, run deploy/kubernetes/render.sh.
# Before applying, set the image (resil:0.1.0) to the one you pushed, and the policy
# (ConfigMap resil, key resil.toml) to yours. docs/deployment.md explains each part.
---
# The agent needs the host network, host paths and capabilities: the namespace must allow
# privileged pods under Pod Security Admission.
apiVersion: v1
kind: Namespace
metadata:
  name: resil
  labels:
    pod-security.kubernetes.io/enforce: privileged
    pod-security.kubernetes.io/warn: privileged
    pod-security.kubernetes.io/audit: privileged
HEAD
"${HELM:-helm}" template resil deploy/helm/resil --namespace resil
