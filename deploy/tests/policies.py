"""Policy checks over the rendered objects of one overlay.

Each check is `check_<name>(objs, ctx) -> list[str]`: the problems it found, each
naming the object and the field. `CHECKS` lists them in the order they run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import model_sizes
from manifests import (
    ROLES,
    Container,
    FieldRef,
    configmaps,
    containers,
    environment,
    pod_templates,
    quantity,
    ref,
    selector_matches,
)

# terminationGracePeriodSeconds = the drain grace (--grace-seconds) + this margin,
# which covers a preStop pause of at most PRESTOP_MAX seconds and the exit.
GRACE_MARGIN = 10
PRESTOP_MAX = 5
DEFAULT_GRACE = 25
# Host memory a Tessera process needs besides its weights and KV cache.
PROCESS_OVERHEAD = 256 * 1024**2

ANYWHERE = "anywhere"
TESSERA_COMPONENTS = ("gateway", "vision-worker", "scheduler", "expert-worker")
# The documented ingress paths (deploy/k8s/base/network-policies.yaml,
# deploy/README.md): (component, named port) -> who may connect. Every other
# port of every pod is reachable from nobody.
EXPECTED_INGRESS = {
    ("gateway", "grpc"): {ANYWHERE},
    ("gateway", "http"): {ANYWHERE},
    ("scheduler", "grpc"): {"gateway"},
    ("vision-worker", "grpc"): {"gateway"},
    ("expert-worker", "grpc"): {"scheduler"},
    ("etcd", "client"): set(TESSERA_COMPONENTS) | {"etcd"},
    ("etcd", "peer"): {"etcd"},
}
# Environment variables a role reads that are not command-line flags.
EXTRA_ENV = {"TESSERA_LOG"}
# What each overlay promises (deploy/README.md).
OVERLAYS = {
    "cpu-dev": {"model": "deepseek-vl2-tiny", "expert_workers": 2, "gpu": set()},
    "gpu": {"model": "deepseek-vl2", "expert_workers": 4, "gpu": {"scheduler", "expert-worker"}},
}
SHARD_WORDS = re.compile(r"shard|ordinal|placement|expert[-_]?(ids?|list|range|index|set)", re.I)


@dataclass
class RoleCli:
    """The flags and environment variables of `tessera <role>`."""

    flags: set[str] = field(default_factory=set)
    env: set[str] = field(default_factory=set)


def parse_help(text: str) -> RoleCli:
    """Flags (`--grpc <GRPC>`) and variables (`[env: TESSERA_GRPC=]`) of clap's --help."""
    return RoleCli(
        flags=set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text, re.M)) - {"--help"},
        env=set(re.findall(r"\[env: ([A-Z0-9_]+)=", text)),
    )


@dataclass
class Context:
    overlay: str
    cli: dict[str, RoleCli]
    cli_source: str


# ---------------------------------------------------------------------------
# helpers


def tessera_containers(objs):
    return [c for c in containers(objs, kinds=("containers",)) if c.role]


def resolved(c: Container, objs) -> dict[str, object]:
    return environment(c, configmaps(objs))


def setting(c: Container, objs, flag: str, env: str) -> object:
    """A setting given as --flag (wins) or environment variable."""
    flags = c.flags()
    if flag in flags:
        return flags[flag]
    return resolved(c, objs).get(env)


def workload(objs, component: str) -> dict | None:
    for pod in pod_templates(objs):
        if pod.component == component and pod.long_running:
            return pod.owner
    return None


def pod_of(objs, component: str):
    for pod in pod_templates(objs):
        if pod.component == component and pod.long_running:
            return pod
    return None


def addr_port(addr: object) -> int | None:
    m = re.search(r":(\d+)$", str(addr or ""))
    return int(m.group(1)) if m else None


def model_name(objs) -> str | None:
    for data in configmaps(objs).values():
        if "MODEL_REPO" in data:
            return data["MODEL_REPO"].rstrip("/").split("/")[-1]
    return None


# ---------------------------------------------------------------------------
# checks


def check_resources(objs, ctx):
    """Every container requests CPU and memory and has a memory limit at least its
    request; GPUs are requested and limited alike."""
    out = []
    for c in containers(objs):
        res = c.spec.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in req:
                out.append(f"{c.where('resources.requests')}: no {key} request")
        if "memory" not in lim:
            out.append(f"{c.where('resources.limits')}: no memory limit")
        elif "memory" in req and quantity(lim["memory"]) < quantity(req["memory"]):
            out.append(f"{c.where('resources.limits.memory')}: below the request")
        gpu_req, gpu_lim = req.get("nvidia.com/gpu"), lim.get("nvidia.com/gpu")
        if (gpu_req or gpu_lim) and str(gpu_req) != str(gpu_lim):
            out.append(f"{c.where('resources')}: nvidia.com/gpu request {gpu_req} != limit {gpu_lim}")
    return out


def check_probes(objs, ctx):
    """Long-running containers have startup, readiness and liveness probes; Tessera
    containers probe `GET /health` on their metrics port (their gRPC port speaks
    mutual TLS, which a Kubernetes gRPC probe cannot)."""
    out = []
    for c in containers(objs, kinds=("containers",)):
        if not c.pod.long_running:
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = c.spec.get(probe)
            if not spec:
                out.append(f"{c.where(probe)}: missing")
                continue
            if c.role:
                get = spec.get("httpGet") or {}
                on_metrics = get.get("port") in ("metrics", c.port("metrics"))
                if get.get("path") != "/health" or not on_metrics:
                    out.append(
                        f"{c.where(probe)}: not an HTTP GET of /health on the metrics port"
                    )
    return out


TLS_ENV = ("TESSERA_TLS_CERT", "TESSERA_TLS_KEY", "TESSERA_TLS_CA")
# The Secret every role mounts its certificate, key and CA from (deploy/README.md).
TLS_SECRET = "tessera-tls"


def check_tls(objs, ctx):
    """Every Tessera container speaks mutual TLS: its certificate, key and CA are set
    and lie in a read-only mount of a Secret, the same Secret for every role."""
    out = []
    secrets = set()
    for c in tessera_containers(objs):
        mounts = {m["name"]: m for m in c.spec.get("volumeMounts", []) or []}
        volumes = {v["name"]: v for v in c.pod.spec.get("volumes", []) or []}
        for env in TLS_ENV:
            flag = "--" + env[len("TESSERA_"):].lower().replace("_", "-")
            path = setting(c, objs, flag, env)
            if not path:
                out.append(f"{c.where('env')}: {env} is not set: members would speak plaintext")
                continue
            mount = next(
                (m for m in mounts.values() if str(path).startswith(m["mountPath"].rstrip("/") + "/")),
                None,
            )
            secret = (volumes.get(mount["name"], {}).get("secret") or {}) if mount else {}
            if not mount or not secret:
                out.append(f"{c.where('volumeMounts')}: {env}={path} is not in a mounted Secret")
                continue
            if mount.get("readOnly") is not True:
                out.append(f"{c.where('volumeMounts')}[{mount['name']}]: not read-only")
            secrets.add(secret.get("secretName"))
    if len(secrets) > 1:
        out.append(f"TLS: the roles mount different Secrets {sorted(secrets)}; one cluster CA is expected")
    return out


def check_security(objs, ctx):
    """Non-root, read-only root filesystem, no privilege escalation, every
    capability dropped, the RuntimeDefault seccomp profile; no host namespaces."""
    out = []
    for pod in pod_templates(objs):
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.spec.get(key):
                out.append(f"{ref(pod.owner)} {pod.path}.{key}: true")
        for v in pod.spec.get("volumes", []) or []:
            if "hostPath" in v:
                out.append(f"{ref(pod.owner)} {pod.path}.volumes[{v['name']}]: hostPath")
    for c in containers(objs):
        pod_sc = c.pod.spec.get("securityContext") or {}
        sc = c.spec.get("securityContext") or {}

        def effective(key):
            return sc.get(key, pod_sc.get(key))

        if effective("runAsNonRoot") is not True:
            out.append(f"{c.where('securityContext.runAsNonRoot')}: not true")
        if effective("runAsUser") == 0:
            out.append(f"{c.where('securityContext.runAsUser')}: 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{c.where('securityContext.readOnlyRootFilesystem')}: not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c.where('securityContext.allowPrivilegeEscalation')}: not false")
        if sc.get("privileged"):
            out.append(f"{c.where('securityContext.privileged')}: true")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{c.where('securityContext.capabilities.drop')}: does not drop ALL")
        if caps.get("add"):
            out.append(f"{c.where('securityContext.capabilities.add')}: {caps['add']}")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c.where('securityContext.seccompProfile')}: {seccomp}")
    return out


def check_service_ports(objs, ctx):
    """Every Service selects pods and each port targets a named container port
    those pods have."""
    out = []
    pods = list(pod_templates(objs))
    for svc in (o for o in objs if o.get("kind") == "Service"):
        selector = svc["spec"].get("selector")
        chosen = [p for p in pods if selector and selector_matches({"matchLabels": selector}, p.labels)]
        if not chosen:
            out.append(f"{ref(svc)} spec.selector: selects no pods")
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            where = f"{ref(svc)} spec.ports[{port.get('name')}].targetPort"
            if not isinstance(target, str):
                out.append(f"{where}: {target!r} is not a named port")
                continue
            for p in chosen:
                names = {
                    cp.get("name")
                    for c in p.spec.get("containers", [])
                    for cp in c.get("ports", []) or []
                    if cp.get("protocol", "TCP") == port.get("protocol", "TCP")
                }
                if target not in names:
                    out.append(f"{where}: {ref(p.owner)} has no container port named {target!r}")
    return out


def _peers(rule_from, pods) -> set[str]:
    if not rule_from:
        return {ANYWHERE}
    out = set()
    for peer in rule_from:
        if "ipBlock" in peer:
            out.add(f"ipBlock {peer['ipBlock'].get('cidr')}")
        elif "namespaceSelector" in peer:
            out.add("other namespaces")
        else:
            for p in pods:
                if selector_matches(peer.get("podSelector"), p.labels):
                    out.add(p.component or ref(p.owner))
    return out


UNDECLARED = "undeclared ports"


def _port_matches(rule_ports, name: str, number: int | None, declared: set) -> bool:
    """Whether a rule's ports cover a container port; number None stands for the
    ports no container declares."""
    if not rule_ports:
        return True
    for rp in rule_ports:
        if "port" not in rp:
            return True
        if number is None:
            if isinstance(rp["port"], int) and rp["port"] not in declared:
                return True
        elif rp["port"] in (name, number):
            return True
    return False


def ingress_sources(objs) -> dict[tuple[str, str], set[str]]:
    """(component, named port) -> who the NetworkPolicies let connect to it; every
    pod also has UNDECLARED, the ports none of its containers names."""
    pods = list(pod_templates(objs))
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    out = {}
    for pod in pods:
        selecting = [
            np for np in policies
            if selector_matches(np["spec"].get("podSelector", {}), pod.labels)
            and "Ingress" in np["spec"].get("policyTypes", ["Ingress"])
        ]
        ports = [cp for c in pod.spec.get("containers", []) for cp in c.get("ports", []) or []]
        declared = {cp["containerPort"] for cp in ports}
        targets = [(cp.get("name") or str(cp["containerPort"]), cp["containerPort"]) for cp in ports]
        for name, number in targets + [(UNDECLARED, None)]:
            key = (pod.component or ref(pod.owner), name)
            if not selecting:
                out[key] = {ANYWHERE}
                continue
            sources = set()
            for np in selecting:
                for rule in np["spec"].get("ingress", []) or []:
                    if _port_matches(rule.get("ports"), name, number, declared):
                        sources |= _peers(rule.get("from"), pods)
            out[key] = sources
    return out


def check_network_policies(objs, ctx):
    """The NetworkPolicies allow exactly EXPECTED_INGRESS: gateway <- anywhere;
    scheduler and vision-worker <- gateway; expert-worker <- scheduler; etcd <-
    Tessera pods; nothing else, metrics ports included."""
    out = []
    actual = ingress_sources(objs)
    for key in EXPECTED_INGRESS:
        if key not in actual:
            out.append(f"NetworkPolicy: documented path to {key[0]} port {key[1]}: no such pod port")
    for key, got in sorted(actual.items()):
        want = EXPECTED_INGRESS.get(key, set())
        if got != want:
            out.append(
                f"NetworkPolicy: {key[0]} port {key[1]} is reachable from "
                f"{sorted(got) or 'nobody'}, documented: {sorted(want) or 'nobody'}"
            )
    return out


def check_grace(objs, ctx):
    """terminationGracePeriodSeconds = the drain grace + GRACE_MARGIN, and a preStop
    pause fits in the margin."""
    out = []
    for c in tessera_containers(objs):
        raw = setting(c, objs, "--grace-seconds", "TESSERA_GRACE_SECONDS")
        try:
            grace = DEFAULT_GRACE if raw is None else int(str(raw))
        except ValueError:
            out.append(f"{c.where('env.TESSERA_GRACE_SECONDS')}: {raw!r} is not a number")
            continue
        period = c.pod.spec.get("terminationGracePeriodSeconds", 30)
        if period != grace + GRACE_MARGIN:
            out.append(
                f"{ref(c.pod.owner)} {c.pod.path}.terminationGracePeriodSeconds: {period}, "
                f"want the grace {grace} + {GRACE_MARGIN}"
            )
        pre = ((c.spec.get("lifecycle") or {}).get("preStop") or {})
        pause = (pre.get("sleep") or {}).get("seconds", 0)
        if pre and not pre.get("sleep"):
            out.append(f"{c.where('lifecycle.preStop')}: only a sleep pause is expected")
        if pause > PRESTOP_MAX:
            out.append(f"{c.where('lifecycle.preStop.sleep.seconds')}: {pause} > {PRESTOP_MAX}")
    return out


def check_cli(objs, ctx):
    """Every flag and TESSERA_* variable a Tessera container gets exists in
    `tessera <role> --help`."""
    out = []
    for c in tessera_containers(objs):
        cli = ctx.cli.get(c.role)
        if cli is None:
            out.append(f"{c.where('args')}: no --help for role {c.role}")
            continue
        for flag in c.flags():
            if flag not in cli.flags:
                out.append(f"{c.where('args')}: {flag} is not a flag of `tessera {c.role}` ({ctx.cli_source})")
        for name in resolved(c, objs):
            if name.startswith("TESSERA_") and name not in cli.env | EXTRA_ENV:
                out.append(f"{c.where('env')}: {name} is not read by `tessera {c.role}` ({ctx.cli_source})")
    return out


def check_ports(objs, ctx):
    """The --grpc, --http and --metrics addresses listen on the named container ports,
    and the scrape annotations point at the metrics port."""
    out = []
    for c in tessera_containers(objs):
        wanted = ["grpc", "metrics"] + (["http"] if c.role == "gateway" else [])
        for name in wanted:
            addr = setting(c, objs, f"--{name}", f"TESSERA_{name.upper()}")
            port = c.port(name)
            if port is None:
                out.append(f"{c.where('ports')}: no container port named {name!r}")
            elif addr_port(addr) != port:
                out.append(f"{c.where('args')}: --{name} {addr!r} does not listen on the {name} port {port}")
        ann = c.pod.annotations
        if ann.get("prometheus.io/scrape") != "true":
            out.append(f"{ref(c.pod.owner)} template annotations: prometheus.io/scrape is not \"true\"")
        if str(ann.get("prometheus.io/port")) != str(c.port("metrics")):
            out.append(
                f"{ref(c.pod.owner)} template annotations: prometheus.io/port "
                f"{ann.get('prometheus.io/port')!r} is not the metrics port"
            )
    return out


def check_expert_workers(objs, ctx):
    """Expert-workers are one StatefulSet of identical pods: discovery through etcd,
    id and address from the downward API, nothing shard- or pod-specific."""
    out = []
    pod = pod_of(objs, "expert-worker")
    if pod is None or pod.owner["kind"] != "StatefulSet":
        return ["expert-worker: no StatefulSet runs the expert-workers"]
    owner = ref(pod.owner)
    if pod.owner["spec"].get("volumeClaimTemplates"):
        out.append(f"{owner} spec.volumeClaimTemplates: per-pod state")
    shared_cms = set()
    for c in tessera_containers(objs):
        if c.role != "expert-worker":
            for s in c.spec.get("envFrom", []) or []:
                shared_cms.add((s.get("configMapRef") or {}).get("name"))
    for v in pod.spec.get("volumes", []) or []:
        claim = (v.get("persistentVolumeClaim") or {})
        secret = (v.get("secret") or {}).get("secretName")
        if "emptyDir" in v or (claim and claim.get("readOnly")) or secret == TLS_SECRET:
            continue
        out.append(
            f"{owner} {pod.path}.volumes[{v['name']}]: only the read-only model volume, "
            "the cluster TLS Secret and emptyDirs"
        )
    for c in (x for x in containers(objs) if x.pod.owner is pod.owner):
        for s in c.spec.get("envFrom", []) or []:
            name = (s.get("configMapRef") or s.get("secretRef") or {}).get("name")
            if name not in shared_cms:
                out.append(f"{c.where('envFrom')}: {name} is not the settings every role shares")
        for text in (c.spec.get("args") or []) + [
            f"{e['name']}={e.get('value', '')}" for e in c.spec.get("env", []) or []
        ]:
            if SHARD_WORDS.search(text):
                out.append(f"{c.where()}: shard-specific setting {text!r}")
        if not c.role:
            continue
        env = resolved(c, objs)
        if c.flags().get("--discovery-file") or env.get("TESSERA_DISCOVERY_FILE"):
            out.append(f"{c.where('env')}: static discovery; expert-workers must register through etcd")
        if not setting(c, objs, "--etcd", "TESSERA_ETCD"):
            out.append(f"{c.where('env.TESSERA_ETCD')}: no etcd endpoints")
        ident = setting(c, objs, "--id", "TESSERA_ID")
        if ident is not None and ident != FieldRef("metadata.name"):
            out.append(f"{c.where('env.TESSERA_ID')}: {ident!r}, want the pod name (downward API)")
        adv = setting(c, objs, "--advertise", "TESSERA_ADVERTISE")
        if adv is not None and "<status.podIP>" not in str(adv):
            out.append(f"{c.where('env.TESSERA_ADVERTISE')}: {adv!r}, want the pod IP (downward API)")
    for o in objs:
        if re.fullmatch(r"expert-worker-\d+.*", o["metadata"]["name"]):
            out.append(f"{ref(o)}: per-pod object for one expert-worker")
    return out


def check_model(objs, ctx):
    """TESSERA_MODEL is /models/<MODEL_REPO name>, and every Tessera container and the
    download Job mount the model volume at /models (read-only for the services)."""
    out = []
    for name, data in configmaps(objs).items():
        if "MODEL_REPO" in data or "TESSERA_MODEL" in data:
            want = "/models/" + str(data.get("MODEL_REPO", "")).rstrip("/").split("/")[-1]
            if data.get("TESSERA_MODEL") != want:
                out.append(f"ConfigMap/{name} data.TESSERA_MODEL: {data.get('TESSERA_MODEL')!r}, want {want!r}")
    for c in containers(objs):
        env = resolved(c, objs)
        if "TESSERA_MODEL" not in env:
            continue
        claims = {
            v["name"]: v["persistentVolumeClaim"]
            for v in c.pod.spec.get("volumes", []) or []
            if "persistentVolumeClaim" in v
        }
        mounts = [m for m in c.spec.get("volumeMounts", []) or [] if m["name"] in claims and m["mountPath"] == "/models"]
        if not mounts:
            out.append(f"{c.where('volumeMounts')}: the model volume is not mounted at /models")
        elif c.role and not mounts[0].get("readOnly"):
            out.append(f"{c.where('volumeMounts')}: the model volume is writable")
    return out


def check_memory(objs, ctx):
    """Memory requests hold the weights of the deployed model (deploy/tests/model_sizes.py)
    plus the scheduler's KV cache, which must be set explicitly."""
    out = []
    name = model_name(objs)
    if name not in model_sizes.VARIANTS:
        return [f"ConfigMap data.MODEL_REPO: {name!r} is not a released DeepSeek-VL2 variant"]
    experts = workload(objs, "expert-worker")
    n = (experts or {}).get("spec", {}).get("replicas", 1)
    for c in tessera_containers(objs):
        if c.role == "gateway":
            continue
        dtype = str(setting(c, objs, "--dtype", "TESSERA_DTYPE") or "f32")
        need = model_sizes.component_bytes(name, n, scheduler_dtype=dtype, vision_dtype=dtype)[c.role]
        if c.role == "scheduler":
            kv = setting(c, objs, "--kv-cache-bytes", "TESSERA_KV_CACHE_BYTES")
            if kv is None:
                out.append(f"{c.where('env')}: TESSERA_KV_CACHE_BYTES unset (its default is a tenth of the memory limit; size it from the pod's budget)")
                continue
            need += int(str(kv))
        need += PROCESS_OVERHEAD
        req = ((c.spec.get("resources") or {}).get("requests") or {}).get("memory")
        if req is None or quantity(req) < need:
            out.append(
                f"{c.where('resources.requests.memory')}: {req}, {name} needs "
                f"{need / 1024**3:.2f} GiB here ({n} expert-workers, {dtype})"
            )
    return out


def check_gpu(objs, ctx):
    """GPU containers run the CUDA image on GPU nodes and compute on their GPU
    (TESSERA_DEVICE=cuda:N); each overlay deploys the model, expert pool and GPU
    components it documents."""
    out = []
    gpu_components = set()
    for c in containers(objs, kinds=("containers",)):
        res = c.spec.get("resources") or {}
        if "nvidia.com/gpu" not in (res.get("limits") or {}):
            continue
        gpu_components.add(c.pod.component)
        if "cuda" not in c.spec.get("image", ""):
            out.append(f"{c.where('image')}: {c.spec.get('image')} is not the CUDA image")
        tolerations = c.pod.spec.get("tolerations") or []
        if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
            out.append(f"{ref(c.pod.owner)} {c.pod.path}.tolerations: no nvidia.com/gpu toleration")
        if not (c.pod.spec.get("nodeSelector") or c.pod.spec.get("affinity", {}).get("nodeAffinity")):
            out.append(f"{ref(c.pod.owner)} {c.pod.path}.nodeSelector: GPU pods must select GPU nodes")
        # Without --device cuda:N the process computes on the CPU and the GPU sits idle.
        device = {e["name"]: e.get("value", "") for e in c.spec.get("env", []) or []}.get("TESSERA_DEVICE", "")
        if not device.startswith("cuda"):
            out.append(f"{c.where('env')}: a GPU is requested but TESSERA_DEVICE is {device or 'unset'} (the CPU)")
    want = OVERLAYS.get(ctx.overlay)
    if want is None:
        return out
    if gpu_components != want["gpu"]:
        out.append(f"{ctx.overlay}: GPUs requested by {sorted(gpu_components)}, documented {sorted(want['gpu'])}")
    if model_name(objs) != want["model"]:
        out.append(f"{ctx.overlay}: serves {model_name(objs)!r}, documented {want['model']!r}")
    experts = workload(objs, "expert-worker") or {}
    if experts.get("spec", {}).get("replicas") != want["expert_workers"]:
        out.append(
            f"{ref(experts)} spec.replicas: {experts.get('spec', {}).get('replicas')}, "
            f"documented {want['expert_workers']}"
        )
    if want["gpu"]:
        spread = (pod_of(objs, "expert-worker").spec.get("topologySpreadConstraints") or [])
        if not any(t.get("topologyKey") == "kubernetes.io/hostname" for t in spread):
            out.append(f"{ref(experts)} spec.template.spec.topologySpreadConstraints: not spread over nodes")
    return out


def check_layout(objs, ctx):
    """The components have the documented kinds: etcd (StatefulSet of 3 with volumes and
    a Service), gateway and vision-worker (Deployments with CPU autoscalers),
    scheduler and expert-worker (StatefulSets with PodDisruptionBudgets), the model
    volume and its download Job."""
    out = []
    kinds = {"etcd": "StatefulSet", "gateway": "Deployment", "vision-worker": "Deployment",
             "scheduler": "StatefulSet", "expert-worker": "StatefulSet"}
    for component, kind in kinds.items():
        owner = workload(objs, component)
        if owner is None or owner["kind"] != kind:
            out.append(f"{component}: not run by a {kind}")
    etcd = workload(objs, "etcd")
    if etcd and (etcd["spec"].get("replicas") != 3 or not etcd["spec"].get("volumeClaimTemplates")):
        out.append(f"{ref(etcd)}: want 3 members, each with a volume")
    pods = {p.component: p for p in pod_templates(objs)}
    pdbs = [o for o in objs if o.get("kind") == "PodDisruptionBudget"]
    for component in ("scheduler", "expert-worker", "etcd"):
        pod = pods.get(component)
        if pod and not any(selector_matches(p["spec"].get("selector"), pod.labels) for p in pdbs):
            out.append(f"{ref(pod.owner)}: no PodDisruptionBudget")
    hpas = [o for o in objs if o.get("kind") == "HorizontalPodAutoscaler"]
    for component in ("gateway", "vision-worker"):
        owner = workload(objs, component)
        if owner is None:
            continue
        hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == owner["metadata"]["name"]]
        if not hpa or not any(
            m.get("resource", {}).get("name") == "cpu" for m in hpa[0]["spec"].get("metrics", [])
        ):
            out.append(f"{ref(owner)}: no HorizontalPodAutoscaler on CPU")
        elif "replicas" in owner["spec"]:
            out.append(f"{ref(owner)} spec.replicas: set, but the HorizontalPodAutoscaler owns it")
    if not any(o.get("kind") == "Job" and o["metadata"]["name"] == "model-download" for o in objs):
        out.append("Job/model-download: missing")
    return out


def check_images(objs, ctx):
    """Every image names a tag other than latest, or a digest."""
    out = []
    for c in containers(objs):
        image = c.spec.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and tag in ("", "latest"):
            out.append(f"{c.where('image')}: {image!r} has no fixed tag")
    return out


CHECKS = [
    check_layout,
    check_resources,
    check_probes,
    check_tls,
    check_security,
    check_service_ports,
    check_network_policies,
    check_grace,
    check_cli,
    check_ports,
    check_expert_workers,
    check_model,
    check_memory,
    check_gpu,
    check_images,
]


def readme_cli(readme: str) -> dict[str, RoleCli]:
    """The flags and variables README.md documents (every role gets the union): the
    fallback when no binary is at hand."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    flags = set(re.findall(r"`(--[a-z0-9][a-z0-9-]*)", text))
    # A documented flag's variable is usually TESSERA_<FLAG>; README names the others.
    derived = {"TESSERA_" + f[2:].upper().replace("-", "_") for f in flags}
    cli = RoleCli(flags=flags, env=set(re.findall(r"\b(TESSERA_[A-Z0-9_]+)\b", text)) | derived)
    return {role: cli for role in ROLES}


def binary_cli(binary: str) -> dict[str, RoleCli]:
    import subprocess

    out = {}
    for role in ROLES:
        text = subprocess.run(
            [os.path.abspath(binary), role, "--help"], check=True, capture_output=True, text=True
        ).stdout
        out[role] = parse_help(text)
    return out
