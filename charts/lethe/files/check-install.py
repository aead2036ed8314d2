"""Check that a Lethe installation works; the chart's `helm test` Pod runs this.

It passes when, within --timeout-seconds, all of these hold:

- the API server serves ModelLineage and UnlearnRequest in the namespace,
  which needs the CRDs installed and established;
- the operator Deployment has at least one available replica;
- the operator's metrics endpoint (--metrics-url, optional) returns HTTP 200 with
  Prometheus text.

It prints one line per check and exits 1 naming the first check that still
failed at the deadline. Inside a Pod it uses the Pod's ServiceAccount;
elsewhere it uses $KUBECONFIG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP = "lethe.dev"
VERSION = "v1alpha1"
PLURALS = ("modellineages", "unlearnrequests")
POLL_SECONDS = 2.0


def check_resources_served(namespace: str) -> str | None:
    api = client.CustomObjectsApi()
    for plural in PLURALS:
        try:
            api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, limit=1)
        except ApiException as err:
            return f"listing {plural}.{GROUP}/{VERSION} in {namespace} failed with HTTP {err.status} {err.reason}"
    return None


def check_deployment_available(namespace: str, name: str) -> str | None:
    try:
        deployment = client.AppsV1Api().read_namespaced_deployment(name, namespace)
    except ApiException as err:
        return f"reading Deployment {namespace}/{name} failed with HTTP {err.status} {err.reason}"
    available = (deployment.status.available_replicas if deployment.status else None) or 0
    if available < 1:
        return f"Deployment {namespace}/{name} has {available} available replicas"
    return None


def check_metrics(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read(1 << 20).decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return f"GET {url} failed: {err}"
    if "# TYPE " not in body:
        return f"GET {url} returned no Prometheus metrics"
    return None


def wait_for(description: str, check: Callable[[], str | None], deadline: float) -> bool:
    while True:
        problem = check()
        if problem is None:
            print(f"ok: {description}")
            return True
        if time.monotonic() >= deadline:
            print(f"FAILED: {description}: {problem}", file=sys.stderr)
            return False
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a Lethe installation.")
    parser.add_argument("--namespace", required=True, help="namespace of the release")
    parser.add_argument("--deployment", required=True, help="name of the operator Deployment")
    parser.add_argument("--metrics-url", help="operator metrics URL; skipped when not given")
    parser.add_argument("--timeout-seconds", type=float, default=120.0,
                        help="seconds to wait for all checks to pass (default 120)")
    args = parser.parse_args(argv)

    if "KUBERNETES_SERVICE_HOST" in os.environ:
        config.load_incluster_config()
    else:
        config.load_kube_config()

    deadline = time.monotonic() + args.timeout_seconds
    checks = [
        (f"{GROUP} resources are served in {args.namespace}", lambda: check_resources_served(args.namespace)),
        (f"Deployment {args.deployment} is available", lambda: check_deployment_available(args.namespace, args.deployment)),
    ]
    if args.metrics_url:
        checks.append((f"metrics at {args.metrics_url}", lambda: check_metrics(args.metrics_url)))

    for description, check in checks:
        if not wait_for(description, check, deadline):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
