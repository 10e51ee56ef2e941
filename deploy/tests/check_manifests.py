#!/usr/bin/env python3
"""Renders the Kubernetes overlays, validates every object against the Kubernetes
schemas offline, and runs the policy checks of policies.py over them.

    deploy/tests/check_manifests.py --tessera-bin target/debug/tessera
    deploy/tests/check_manifests.py --self-test     # each check catches a broken manifest

Needs `kubectl` (its built-in kustomize) and the Python packages of
deploy/tests/requirements.txt (kubernetes-validate, PyYAML). The flags and
environment variables the manifests give `tessera` are checked against
`tessera <role> --help` of --tessera-bin, or without it against README.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import policies  # noqa: E402
from manifests import containers, pod_templates, ref  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
OVERLAYS_DIR = os.path.join(REPO, "deploy", "k8s", "overlays")
OVERLAYS = ("cpu-dev", "gpu")
# The Kubernetes release whose schemas the objects must satisfy (strict: unknown
# fields are errors). The manifests need 1.30 or newer (preStop sleep).
KUBERNETES_VERSION = "1.32.0"


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", os.path.join(OVERLAYS_DIR, overlay)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def validate_schemas(objs: list[dict], version: str) -> list[str]:
    """Every object against the strict schema of `version`; an object whose kind has
    no schema is an error, not a warning."""
    import kubernetes_validate

    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{ref(obj)} {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{ref(obj)}: {e.message}")
    return problems


def run_checks(objs: list[dict], ctx: policies.Context) -> dict[str, list[str]]:
    return {check.__name__: check(objs, ctx) for check in policies.CHECKS}


# ---------------------------------------------------------------------------
# --self-test: break one thing in a rendered overlay and expect the check that
# guards it to say so, naming the object.


def find(objs, kind, name):
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise KeyError(f"{kind}/{name}")


def container(objs, owner, name):
    for c in containers(objs):
        if ref(c.pod.owner) == owner and c.name == name:
            return c.spec
    raise KeyError(f"{owner} container {name}")


def pod_spec(objs, owner):
    for p in pod_templates(objs):
        if ref(p.owner) == owner:
            return p.spec
    raise KeyError(owner)


def policy(objs, name):
    return find(objs, "NetworkPolicy", name)["spec"]


def set_env(c, name, value):
    """Sets (or with value None, removes) a literal environment variable."""
    env = [e for e in c.get("env", []) if e["name"] != name]
    if value is not None:
        env.append({"name": name, "value": value})
    c["env"] = env


def _cm(objs):
    return next(o for o in objs if o["kind"] == "ConfigMap")["data"]


EW, SCH, GW, VW = ("StatefulSet/expert-worker", "StatefulSet/scheduler",
                   "Deployment/gateway", "Deployment/vision-worker")

# (check, overlay, what is broken, mutation, text the report must contain)
MUTATIONS = [
    ("check_layout", "cpu-dev", "scheduler PodDisruptionBudget removed",
     lambda o: o.remove(find(o, "PodDisruptionBudget", "scheduler")), "StatefulSet/scheduler: no PodDisruptionBudget"),
    ("check_layout", "cpu-dev", "gateway without its autoscaler",
     lambda o: o.remove(find(o, "HorizontalPodAutoscaler", "gateway")), "Deployment/gateway: no HorizontalPodAutoscaler"),
    ("check_resources", "cpu-dev", "expert-worker without requests",
     lambda o: container(o, EW, "expert-worker")["resources"].pop("requests"), "containers[expert-worker].resources.requests"),
    ("check_resources", "gpu", "init container without a memory limit",
     lambda o: container(o, SCH, "wait-for-model")["resources"].pop("limits"), "initContainers[wait-for-model].resources.limits"),
    ("check_probes", "cpu-dev", "scheduler without a readiness probe",
     lambda o: container(o, SCH, "scheduler").pop("readinessProbe"), "containers[scheduler].readinessProbe: missing"),
    ("check_probes", "cpu-dev", "gateway liveness probe on the TLS gRPC port",
     lambda o: container(o, GW, "gateway").update(livenessProbe={"grpc": {"port": 50051}}), "livenessProbe: not an HTTP GET of /health"),
    ("check_tls", "cpu-dev", "scheduler without the cluster CA",
     lambda o: (_cm(o).pop("TESSERA_TLS_CA"),), "TESSERA_TLS_CA is not set"),
    ("check_tls", "gpu", "expert-worker certificate outside the Secret",
     lambda o: container(o, EW, "expert-worker").update(volumeMounts=[
         m for m in container(o, EW, "expert-worker")["volumeMounts"] if m["name"] != "tls"]),
     "TESSERA_TLS_CERT=/etc/tessera/tls/tls.crt is not in a mounted Secret"),
    ("check_security", "cpu-dev", "gateway with a writable root filesystem",
     lambda o: container(o, GW, "gateway")["securityContext"].update(readOnlyRootFilesystem=False), "containers[gateway].securityContext.readOnlyRootFilesystem"),
    ("check_security", "gpu", "expert-worker allowed to run as root",
     lambda o: (container(o, EW, "expert-worker")["securityContext"].pop("runAsNonRoot"),
                pod_spec(o, EW)["securityContext"].pop("runAsNonRoot")), "containers[expert-worker].securityContext.runAsNonRoot"),
    ("check_security", "cpu-dev", "etcd keeping its capabilities",
     lambda o: container(o, "StatefulSet/etcd", "etcd")["securityContext"].pop("capabilities"), "containers[etcd].securityContext.capabilities.drop"),
    ("check_service_ports", "cpu-dev", "gateway Service targeting a port nobody names",
     lambda o: find(o, "Service", "gateway")["spec"]["ports"][0].update(targetPort="grpcs"), "Service/gateway spec.ports[grpc].targetPort"),
    ("check_service_ports", "gpu", "scheduler Service targeting a port number",
     lambda o: find(o, "Service", "scheduler")["spec"]["ports"][0].update(targetPort=50052), "is not a named port"),
    ("check_network_policies", "cpu-dev", "expert-workers reachable from the gateway",
     lambda o: policy(o, "expert-worker")["ingress"][0]["from"].append(
         {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}),
     "expert-worker port grpc is reachable from ['gateway', 'scheduler']"),
    ("check_network_policies", "cpu-dev", "scheduler cut off from the gateway",
     lambda o: o.remove(find(o, "NetworkPolicy", "scheduler")),
     "scheduler port grpc is reachable from nobody, documented: ['gateway']"),
    ("check_network_policies", "gpu", "default deny removed",
     lambda o: o.remove(find(o, "NetworkPolicy", "default-deny-ingress")),
     "model-download port undeclared ports is reachable from ['anywhere']"),
    ("check_network_policies", "cpu-dev", "gateway metrics opened to everyone",
     lambda o: policy(o, "gateway")["ingress"][0]["ports"].append({"port": "metrics"}),
     "gateway port metrics is reachable from ['anywhere']"),
    ("check_network_policies", "gpu", "etcd open to other namespaces",
     lambda o: policy(o, "etcd")["ingress"][0]["from"].append({"namespaceSelector": {}}), "etcd port client is reachable from"),
    ("check_grace", "cpu-dev", "scheduler killed before its drain ends",
     lambda o: pod_spec(o, SCH).update(terminationGracePeriodSeconds=25), "terminationGracePeriodSeconds: 25, want the grace 25 + 10"),
    ("check_grace", "gpu", "grace raised in the ConfigMap alone",
     lambda o: _cm(o).update(TESSERA_GRACE_SECONDS="60"), "want the grace 60 + 10"),
    ("check_cli", "cpu-dev", "expert-worker given a flag the binary lacks",
     lambda o: container(o, EW, "expert-worker")["args"].append("--experts=0-31"), "--experts is not a flag of `tessera expert-worker`"),
    ("check_cli", "cpu-dev", "gateway given the scheduler's KV cache size",
     lambda o: set_env(container(o, GW, "gateway"), "TESSERA_KV_CACHE_BYTES", "1000000"), "TESSERA_KV_CACHE_BYTES is not read by `tessera gateway`"),
    ("check_ports", "cpu-dev", "scheduler listening on another port than it exposes",
     lambda o: container(o, SCH, "scheduler")["args"].__setitem__(1, "--grpc=0.0.0.0:50099"), "--grpc '0.0.0.0:50099' does not listen on the grpc port 50052"),
    ("check_ports", "gpu", "vision-worker metrics not scraped",
     lambda o: find(o, "Deployment", "vision-worker")["spec"]["template"]["metadata"]["annotations"].pop("prometheus.io/scrape"), "prometheus.io/scrape"),
    ("check_expert_workers", "cpu-dev", "expert-worker with static discovery",
     lambda o: set_env(container(o, EW, "expert-worker"), "TESSERA_DISCOVERY_FILE", "/etc/members.json"), "static discovery"),
    ("check_expert_workers", "cpu-dev", "expert-worker with a fixed id",
     lambda o: set_env(container(o, EW, "expert-worker"), "TESSERA_ID", "expert-worker-a"), "want the pod name"),
    ("check_expert_workers", "gpu", "expert-worker with a per-pod ConfigMap",
     lambda o: (o.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "expert-worker-0"}, "data": {}}),
                container(o, EW, "expert-worker")["envFrom"].append({"configMapRef": {"name": "expert-worker-0"}})),
     "expert-worker-0 is not the settings every role shares"),
    ("check_expert_workers", "cpu-dev", "expert-worker with a shard setting",
     lambda o: set_env(container(o, EW, "expert-worker"), "SHARD_INDEX", "1"), "shard-specific setting"),
    ("check_model", "cpu-dev", "model path and Hub repository disagree",
     lambda o: _cm(o).update(TESSERA_MODEL="/models/deepseek-vl2-small"), "want '/models/deepseek-vl2-tiny'"),
    ("check_model", "gpu", "scheduler without the model volume",
     lambda o: container(o, SCH, "scheduler").update(volumeMounts=[]), "containers[scheduler].volumeMounts: the model volume is not mounted"),
    ("check_memory", "cpu-dev", "expert-worker memory too small for its share",
     lambda o: container(o, EW, "expert-worker")["resources"]["requests"].update(memory="2Gi"), "deepseek-vl2-tiny needs"),
    ("check_memory", "cpu-dev", "one expert-worker holding every expert",
     lambda o: find(o, "StatefulSet", "expert-worker")["spec"].update(replicas=1), "(1 expert-workers, f32)"),
    ("check_memory", "gpu", "scheduler KV cache left to its default",
     lambda o: set_env(container(o, SCH, "scheduler"), "TESSERA_KV_CACHE_BYTES", None), "TESSERA_KV_CACHE_BYTES unset"),
    ("check_gpu", "gpu", "GPU pod without the GPU toleration",
     lambda o: pod_spec(o, EW).pop("tolerations"), "no nvidia.com/gpu toleration"),
    ("check_gpu", "gpu", "expert-workers on the CPU image",
     lambda o: container(o, EW, "expert-worker").update(image="ghcr.io/tessera-serving/tessera:0.1.0"), "is not the CUDA image"),
    ("check_gpu", "gpu", "expert-workers computing on the CPU beside their GPU",
     lambda o: set_env(container(o, EW, "expert-worker"), "TESSERA_DEVICE", None), "TESSERA_DEVICE is unset"),
    ("check_gpu", "gpu", "expert-workers not spread over nodes",
     lambda o: pod_spec(o, EW).pop("topologySpreadConstraints"), "not spread over nodes"),
    ("check_gpu", "cpu-dev", "cpu-dev with three expert-workers",
     lambda o: find(o, "StatefulSet", "expert-worker")["spec"].update(replicas=3), "spec.replicas: 3, documented 2"),
    ("check_images", "cpu-dev", "etcd on a floating tag",
     lambda o: container(o, "StatefulSet/etcd", "etcd").update(image="quay.io/coreos/etcd:latest"), "has no fixed tag"),
]


def schema_mutation(objs):
    """An unknown field, which only strict validation rejects."""
    container(objs, GW, "gateway")["readinessProbe"]["grpcPort"] = 50051


def self_test(rendered: dict[str, list[dict]], ctx_for) -> int:
    failures = 0
    for check_name, overlay, what, mutate, expect in MUTATIONS:
        objs = copy.deepcopy(rendered[overlay])
        mutate(objs)
        problems = getattr(policies, check_name)(objs, ctx_for(overlay))
        caught = [p for p in problems if expect in p]
        status = "caught" if caught else "MISSED"
        failures += not caught
        print(f"  {status:7} {check_name} [{overlay}] {what}")
        for p in caught[:1] or problems[:3]:
            print(f"          -> {p}")
        if not caught:
            print(f"          expected a problem containing {expect!r}")
    objs = copy.deepcopy(rendered["cpu-dev"])
    schema_mutation(objs)
    problems = validate_schemas([find(objs, "Deployment", "gateway")], KUBERNETES_VERSION)
    caught = any("grpcPort" in p for p in problems)
    failures += not caught
    print(f"  {'caught' if caught else 'MISSED':7} schema [cpu-dev] unknown field in a probe")
    for p in problems[:1]:
        print(f"          -> {p}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tessera-bin", help="binary whose --help lists each role's flags")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    parser.add_argument("--self-test", action="store_true",
                        help="also break each policy on purpose and expect its check to notice")
    parser.add_argument("overlays", nargs="*", default=list(OVERLAYS))
    args = parser.parse_args()

    if args.tessera_bin:
        cli, source = policies.binary_cli(args.tessera_bin), f"{args.tessera_bin} --help"
    else:
        cli, source = policies.readme_cli(os.path.join(REPO, "README.md")), "README.md"
        print("no --tessera-bin: checking flags against README.md")

    def ctx_for(overlay):
        return policies.Context(overlay=overlay, cli=cli, cli_source=source)

    failures = 0
    rendered = {}
    for overlay in args.overlays:
        t0 = time.monotonic()
        objs = render(overlay)
        rendered[overlay] = objs
        t1 = time.monotonic()
        schema = validate_schemas(objs, args.kubernetes_version)
        t2 = time.monotonic()
        results = run_checks(objs, ctx_for(overlay))
        t3 = time.monotonic()
        print(f"{overlay}: {len(objs)} objects (render {t1 - t0:.1f}s, "
              f"schemas {t2 - t1:.1f}s, policies {t3 - t2:.1f}s)")
        print(f"  {'ok' if not schema else 'FAIL':4} schemas (Kubernetes {args.kubernetes_version}, strict)")
        for p in schema:
            print(f"       {p}")
        failures += len(schema)
        for name, problems in results.items():
            print(f"  {'ok' if not problems else 'FAIL':4} {name}")
            for p in problems:
                print(f"       {p}")
            failures += len(problems)

    if args.self_test:
        missing = [o for o in OVERLAYS if o not in rendered]
        for overlay in missing:
            rendered[overlay] = render(overlay)
        print("self-test: each check against a deliberately broken manifest")
        failures += self_test(rendered, ctx_for)

    print("PASS" if not failures else f"FAIL: {failures} problem(s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
