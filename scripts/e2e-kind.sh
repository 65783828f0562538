#!/usr/bin/env bash
# End-to-end check on a throwaway kind cluster (needs docker, kind and kubectl).
# Builds the image, applies the manifests with a sample workspace image, runs /exec calls from
# the agent container through the sidecar, checks the answers, and deletes the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="session-proxy-e2e-$$"
namespace=sessions
image=session-proxy:0.1.0
workspace_image=busybox:1.36
agent_image=curlimages/curl:8.10.1

cleanup() { kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; }
trap cleanup EXIT

docker build -t "$image" .
kind create cluster --name "$cluster" --wait 120s
kind load docker-image "$image" --name "$cluster"
kubectl create namespace "$namespace"
kubectl label namespace "$namespace" pod-security.kubernetes.io/enforce=restricted

# The sample images: a busybox workspace (sh, setsid, head, cat, sleep) and curl as the agent,
# which is kept alive with sleep (curl's image has no long-running command of its own).
kubectl kustomize manifests \
  | sed -e "s#example.com/user/tools:1.0#$workspace_image#" \
        -e "s#^\( *\)image: example.com/platform/agent:1.0#\1image: $agent_image\n\1command: [\"sleep\", \"3600\"]#" \
  | kubectl apply -n "$namespace" -f -
kubectl wait -n "$namespace" --for=condition=Ready pod/workspace-demo pod/runner-demo --timeout=180s

agent() { kubectl exec -n "$namespace" runner-demo -c agent -- "$@"; }
# The agent sends the proxy's bearer token from the shared file, as its tools would.
# shellcheck disable=SC2016  # expanded by the agent container's shell
exec_json() {
  agent sh -c 'curl -sS -N http://127.0.0.1:8081/exec -H "Content-Type: application/json" \
    -H "Authorization: Bearer $(cat "$SESSION_PROXY_AUTH_TOKEN_FILE")" -d "$1"' sh "$1"
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
sleep 2
if kubectl exec -n "$namespace" workspace-demo -- ps | grep -q 'sleep 30[01]'; then
  echo "processes left behind"; exit 1
fi

echo "4. the agent holds no token, and cannot reach the API server with one"
if agent ls /var/run/secrets/kubernetes.io/serviceaccount/token 2>/dev/null; then
  echo "the agent container has a token"; exit 1
fi

echo "5. without the bearer token the exec API refuses"
code=$(agent curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8081/status)
[ "$code" = 401 ] || { echo "expected 401 without the token, got $code"; exit 1; }

echo "6. metrics on the ops port"
kubectl get --raw "/api/v1/namespaces/$namespace/pods/runner-demo:9464/proxy/metrics" \
  | grep -q 'session_proxy_exec_requests_total'

echo "e2e: all checks passed"
