#!/usr/bin/env bash
# End-to-end check on a throwaway kind cluster (needs docker, kind and kubectl).
# Builds the image, applies the namespace layer and two sessions of the session layer (busybox
# as the workspace image, curl as the agent), then checks from the agent container, through the
# sidecar: commands, the files the two sides share, MCP, and that one session's identity is
# refused on the other session's pod. Deletes the cluster at the end. (The monitoring layer
# needs prometheus-operator's CRDs and is not applied here.)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="session-proxy-e2e-$$"
namespace=sessions
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
image="session-proxy:$version"
overlays="$(mktemp -d -p "$PWD" .e2e-overlays.XXXXXX)"   # in the repo: kustomize wants relative paths

cleanup() {
  kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  rm -rf "$overlays"
}
trap cleanup EXIT

docker build -t "$image" .
kind create cluster --name "$cluster" --wait 120s
kind load docker-image "$image" --name "$cluster"
kubectl create namespace "$namespace"
kubectl label namespace "$namespace" pod-security.kubernetes.io/enforce=restricted

# Once per namespace: the example's networks are kind's (pods 10.244.0.0/16, services
# 10.96.0.0/12, nodes and API server on the docker network 172.18.0.0/16).
kubectl apply -n "$namespace" -k manifests/examples/namespace

# Once per session: the session layer with the session's name as its one input, and the sample
# images (the curl image has no long-running command of its own: it sleeps).
session_overlay() {
  mkdir "$overlays/$1"
  cat >"$overlays/$1/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
components:
  - ../../manifests/session
configMapGenerator:
  - name: session
    literals: [name=$1]
    options:
      disableNameSuffixHash: true
      annotations: {config.kubernetes.io/local-config: "true"}
images:
  - {name: session-proxy, newTag: "$version"}
  - {name: example.com/user/tools, newName: busybox, newTag: "1.36"}
  - {name: example.com/platform/agent, newName: curlimages/curl, newTag: "8.10.1"}
patches:
  - target: {kind: Pod, labelSelector: app.kubernetes.io/name=session-runner}
    patch: |-
      - {op: add, path: /spec/containers/0/command, value: [sleep, infinity]}
EOF
  kubectl apply -n "$namespace" -k "$overlays/$1"
}
session_overlay demo
session_overlay other
kubectl wait -n "$namespace" --for=condition=Ready --timeout=300s \
  pod/runner-demo pod/workspace-demo pod/runner-other pod/workspace-other

# A shell in the demo session's agent container; the token and URLs are its own variables, so
# every script below is single-quoted: this machine's shell expands nothing in it.
agent() { kubectl exec -n "$namespace" runner-demo -c agent -- sh -c "$1" sh "${@:2}"; }
exec_json() {
  # shellcheck disable=SC2016
  agent 'curl -sS -N "$SESSION_PROXY_URL/exec" -H "Content-Type: application/json" \
    -H "Authorization: Bearer $(cat "$SESSION_PROXY_AUTH_TOKEN_FILE")" -d "$1"' "$1"
}

echo "1. a command's output and exit code"
out=$(exec_json '{"command":["sh","-c","echo hello; exit 3"]}')
echo "$out"
grep -q '"data":"hello\\n"' <<<"$out"
grep -q '"exit_code":3' <<<"$out"
grep -q '"runner":"supervisor"' <<<"$out"  # the init container delivered the supervisor

echo "2. stdin, workdir and env arrive"
# shellcheck disable=SC2016  # $PWD and $X are for the workspace's shell, not this one
out=$(exec_json '{"command":["sh","-c","printf %s:%s: \"$PWD\" \"$X\"; cat"],"workdir":"/tmp","env":{"X":"y"},"stdin":"in"}')
grep -q '/tmp:y:in' <<<"$out" || { echo "$out"; exit 1; }

echo "3. a timeout kills the whole group, and a child that left it (setsid, a double fork)"
out=$(exec_json '{"command":["sh","-c","(setsid sleep 301 >/dev/null 2>&1 &); sleep 300 & sleep 300"],"timeout":2}')
grep -q '"reason":"timeout"' <<<"$out"
for _ in $(seq 20); do
  kubectl exec -n "$namespace" workspace-demo -- ps | grep -q 'sleep 30[01]' || break
  sleep 1
done
if kubectl exec -n "$namespace" workspace-demo -- ps | grep -q 'sleep 30[01]'; then
  echo "processes left behind"; exit 1
fi

echo "4. the agent's files and the workspace's commands share /workspace"
agent 'echo from-agent > /workspace/notes'
out=$(exec_json '{"command":["sh","-c","cat notes; echo from-workspace >> notes; touch made-here; id -u"],"workdir":"/workspace"}')
grep -q '"data":"from-agent\\n' <<<"$out" || { echo "$out"; exit 1; }
[ "$(agent 'cat /workspace/notes')" = "$(printf 'from-agent\nfrom-workspace')" ]
agent 'test -f /workspace/made-here && echo more >> /workspace/made-here'

echo "5. MCP: the exec tool starts in /workspace"
# shellcheck disable=SC2016
out=$(agent '
  auth="Authorization: Bearer $(cat "$SESSION_PROXY_AUTH_TOKEN_FILE")"
  accept="Accept: application/json, text/event-stream"
  json="Content-Type: application/json"
  id=$(curl -sS -D - -o /dev/null "$SESSION_PROXY_MCP_URL" -H "$auth" -H "$accept" -H "$json" \
    -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":\"e2e\",\"version\":\"1\"}}}" \
    | tr -d "\r" | sed -n "s/^[Mm]cp-[Ss]ession-[Ii]d: //p")
  curl -sS -o /dev/null "$SESSION_PROXY_MCP_URL" -H "$auth" -H "$accept" -H "$json" -H "Mcp-Session-Id: $id" \
    -d "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}"
  curl -sS "$SESSION_PROXY_MCP_URL" -H "$auth" -H "$accept" -H "$json" -H "Mcp-Session-Id: $id" \
    -d "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"exec\",\"arguments\":{\"command\":\"pwd; cat notes\"}}}"
')
echo "$out"
grep -q '/workspace\\nfrom-agent\\nfrom-workspace' <<<"$out"

echo "6. one session's identity is refused on the other session's pod"
# A kubeconfig with the session's token alone (kind's own holds an admin client certificate).
demo_config="$overlays/demo.kubeconfig"
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' \
  | base64 -d >"$overlays/ca.crt"
kubectl config --kubeconfig "$demo_config" set-cluster e2e --certificate-authority "$overlays/ca.crt" \
  --server "$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
kubectl config --kubeconfig "$demo_config" set-credentials demo \
  --token "$(kubectl create token -n "$namespace" session-proxy-demo --duration 10m)"
kubectl config --kubeconfig "$demo_config" set-context demo --cluster e2e --user demo --namespace "$namespace"
kubectl config --kubeconfig "$demo_config" use-context demo
as_demo() { kubectl --kubeconfig "$demo_config" "$@"; }
as_demo exec workspace-demo -c workspace -- true
if as_demo exec workspace-other -c workspace -- touch /workspace/taken 2>/dev/null; then
  echo "the demo session's token ran a command in the other session's workspace"; exit 1
fi
if as_demo get pods >/dev/null 2>&1; then
  echo "the demo session's token lists the namespace's pods"; exit 1
fi
as_demo get pods --field-selector metadata.name=workspace-demo -o name | grep -qx pod/workspace-demo
[ "$(kubectl auth can-i -n "$namespace" --as "system:serviceaccount:$namespace:session-proxy-demo" \
  create pods/workspace-other --subresource=exec)" = no ]

echo "7. the agent holds no token, and the exec API wants the proxy's"
if agent 'ls /var/run/secrets/kubernetes.io/serviceaccount/token' 2>/dev/null; then
  echo "the agent container has a token"; exit 1
fi
# shellcheck disable=SC2016
code=$(agent 'curl -s -o /dev/null -w "%{http_code}" "$SESSION_PROXY_URL/status"')
[ "$code" = 401 ] || { echo "expected 401 without the token, got $code"; exit 1; }

echo "8. metrics on the ops port"
kubectl get --raw "/api/v1/namespaces/$namespace/pods/runner-demo:9464/proxy/metrics" \
  | grep -q 'session_proxy_exec_requests_total'

echo "e2e: all checks passed"
