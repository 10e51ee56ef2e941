"""Reading rendered Kubernetes objects: pod templates, containers, the environment a
container sees, label selectors. Shared by the policy checks (policies.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

# The Tessera roles that run as their own pods (`tessera <role>`).
ROLES = ("gateway", "vision-worker", "scheduler", "expert-worker")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")

COMPONENT_LABEL = "app.kubernetes.io/component"


def ref(obj: dict) -> str:
    """`Kind/name`, how every message names an object."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@dataclass
class PodTemplate:
    """The pod a workload runs: its owner, labels, annotations and spec."""

    owner: dict
    labels: dict
    annotations: dict
    spec: dict
    path: str  # where the pod spec sits in the owner, for messages

    @property
    def component(self) -> str | None:
        return self.labels.get(COMPONENT_LABEL)

    @property
    def long_running(self) -> bool:
        return self.owner["kind"] in LONG_RUNNING_KINDS


def pod_templates(objs: list[dict]) -> Iterator[PodTemplate]:
    for obj in objs:
        kind = obj.get("kind")
        if kind not in WORKLOAD_KINDS:
            continue
        if kind == "Pod":
            meta, spec, path = obj["metadata"], obj["spec"], "spec"
        elif kind == "CronJob":
            tmpl = obj["spec"]["jobTemplate"]["spec"]["template"]
            meta, spec, path = tmpl.get("metadata", {}), tmpl["spec"], "spec.jobTemplate.spec.template.spec"
        else:
            tmpl = obj["spec"]["template"]
            meta, spec, path = tmpl.get("metadata", {}), tmpl["spec"], "spec.template.spec"
        yield PodTemplate(obj, meta.get("labels", {}), meta.get("annotations", {}), spec, path)


@dataclass
class Container:
    pod: PodTemplate
    kind: str  # "containers" or "initContainers"
    spec: dict

    @property
    def name(self) -> str:
        return self.spec["name"]

    def where(self, field: str = "") -> str:
        """`Kind/name spec.template.spec.containers[name].field`."""
        tail = f".{field}" if field else ""
        return f"{ref(self.pod.owner)} {self.pod.path}.{self.kind}[{self.name}]{tail}"

    @property
    def role(self) -> str | None:
        """The Tessera role this container runs (`args: [<role>, ...]` on the
        image's `tessera` entrypoint), or None."""
        args = self.spec.get("args") or []
        if self.kind == "containers" and not self.spec.get("command") and args and args[0] in ROLES:
            return args[0]
        return None

    def port(self, name: str) -> int | None:
        for p in self.spec.get("ports", []):
            if p.get("name") == name:
                return p.get("containerPort")
        return None

    def flags(self) -> dict[str, str | None]:
        """`--flag[=value]` arguments after the subcommand."""
        out: dict[str, str | None] = {}
        args = (self.spec.get("args") or [])[1:]
        i = 0
        while i < len(args):
            arg = args[i]
            if arg.startswith("--"):
                name, eq, value = arg.partition("=")
                if eq:
                    out[name] = value
                elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                    out[name] = args[i + 1]
                    i += 1
                else:
                    out[name] = None
            i += 1
        return out


def containers(objs: list[dict], kinds=("initContainers", "containers")) -> Iterator[Container]:
    for pod in pod_templates(objs):
        for kind in kinds:
            for c in pod.spec.get(kind, []) or []:
                yield Container(pod, kind, c)


@dataclass(frozen=True)
class FieldRef:
    """An environment variable set from the downward API."""

    field: str


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


def configmaps(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in objs if o.get("kind") == "ConfigMap"}


def environment(c: Container, cms: dict[str, dict]) -> dict[str, object]:
    """The variables the container sees: envFrom ConfigMaps, then env (which wins).
    Values are strings, FieldRef, SecretRef, or None for a missing reference."""
    env: dict[str, object] = {}
    for source in c.spec.get("envFrom", []) or []:
        if "configMapRef" in source:
            env.update(cms.get(source["configMapRef"]["name"], {}))
    for var in c.spec.get("env", []) or []:
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "valueFrom" in var:
            vf = var["valueFrom"]
            if "fieldRef" in vf:
                env[var["name"]] = FieldRef(vf["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                env[var["name"]] = cms.get(r["name"], {}).get(r["key"])
            elif "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                env[var["name"]] = SecretRef(r["name"], r["key"])
            else:
                env[var["name"]] = None
        else:
            env[var["name"]] = ""
    return env


def expand(value: str, env: dict[str, object]) -> str:
    """Kubernetes' `$(VAR)` expansion; downward-API variables stay symbolic
    (`$(POD_IP)` becomes `<status.podIP>`)."""

    def sub(m: re.Match) -> str:
        v = env.get(m.group(1))
        if isinstance(v, FieldRef):
            return f"<{v.field}>"
        if isinstance(v, str):
            return v
        return m.group(0)

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against `labels`."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def quantity(q: object) -> float:
    """A Kubernetes resource quantity as a number (bytes, cores)."""
    s = str(q)
    suffixes = {
        "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3,
    }
    for suffix, factor in suffixes.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)
