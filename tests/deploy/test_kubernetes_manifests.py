"""The Kubernetes deployment (``deploy/kubernetes``) and its image, read as a specification.

Every kustomization is rendered (``kustomize.render``: the objects kustomize
would build, refusing any kustomize feature it does not reproduce), each
built-in object is validated with kubernetes-validate against Kubernetes'
strict schemas of the oldest version the manifests are for and of the newest
kubernetes-validate knows, and cert-manager's objects against cert-manager's
own CRD schemas (vendored: ``cert_manager_crds``). The remaining tests check
what the schemas cannot: who may reach whom, what the pods mount, which
identities the certificates carry, and that every setting passed is one the
programs read. Nothing here needs a cluster, a network or a container runtime.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tessera.security.identity import SCHEDULER_DNS_NAME, Identity, Role

from . import cert_manager_crds, kustomize, programs

ROOT = programs.ROOT
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
BUNDLED_VALKEY = KUBERNETES / "overlays" / "bundled-valkey"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
DEPLOY_README = ROOT / "deploy" / "README.md"

#: Kubernetes versions the built-in objects must be valid in: the oldest the
#: deployment supports (deploy/README.md) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")

CERT_MANAGER_GROUP = "cert-manager.io/"

SCHEDULER_NS = "tessera"
AGENT_NS = "tessera-agent"
NAME_LABEL = "app.kubernetes.io/name"


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in KUBERNETES.rglob(kustomize.KUSTOMIZATION_FILE))


def build_id(path: Path) -> str:
    return str(path.relative_to(KUBERNETES))


@cache
def _build(directory: Path) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize.render(directory))


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization (a deep copy: tests may change theirs)."""
    return copy.deepcopy(list(_build(directory)))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    obj: dict[str, Any] = found[0]
    return obj


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    c: dict[str, Any] = found[0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"volume {name}: {len(found)} found"
    v: dict[str, Any] = found[0]
    return v


def mount_at(c: dict[str, Any], path: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"{c['name']}: {len(found)} mounts at {path}"
    mount: dict[str, Any] = found[0]
    return mount


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objects:
        if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield o


def tessera_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Containers running the Tessera image (not Valkey's)."""
    for w in workloads(objects):
        spec = pod_spec(w)
        for c in spec["containers"] + spec.get("initContainers", []):
            if c["image"].rpartition(":")[0] == "tessera":
                yield c


# -- rendering and schemas ------------------------------------------------------


def test_the_kustomizations_use_only_what_the_test_renderer_builds() -> None:
    dirs = kustomization_dirs()
    assert BASE in dirs
    assert BUNDLED_VALKEY in dirs
    for directory in dirs:
        assert set(kustomize.read_kustomization(directory)) <= kustomize.SUPPORTED_FIELDS


def test_the_renderer_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "namespace: elsewhere\nresources: [a.yaml]\n"
    )
    with pytest.raises(kustomize.UnsupportedKustomizationError, match="namespace"):
        kustomize.render(tmp_path)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_every_builtin_object_is_valid_in_kubernetes(directory: Path, version: str) -> None:
    for obj in build(directory):
        if obj["apiVersion"].startswith(CERT_MANAGER_GROUP):
            continue
        # strict: every field must be one the schema knows (a typo is an error).
        kubernetes_validate.validate(obj, version, strict=True)


def cert_manager_validator(kind: str) -> Any:
    schema = cert_manager_crds.strict(cert_manager_crds.load()["schemas"][kind])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_every_cert_manager_object_matches_cert_managers_schema(directory: Path) -> None:
    objects = [o for o in build(directory) if o["apiVersion"].startswith(CERT_MANAGER_GROUP)]
    assert objects
    for obj in objects:
        assert obj["apiVersion"] == "cert-manager.io/v1"
        errors = [e.message for e in cert_manager_validator(obj["kind"]).iter_errors(obj)]
        assert errors == [], f"{obj['kind']}/{obj['metadata']['name']}: {errors}"
        # The CRD leaves metadata to the API server: only what it accepts.
        assert set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"}


def test_the_validators_refuse_a_misspelt_field() -> None:
    objects = build(BASE)
    deployment = find(objects, "Deployment", "tessera-scheduler")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    certificate = find(objects, "Certificate", "tessera-scheduler")
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    assert list(cert_manager_validator("Certificate").iter_errors(certificate))


def test_the_vendored_cert_manager_schemas_say_where_they_come_from() -> None:
    vendored = cert_manager_crds.load()
    assert vendored["version"].startswith("v1.")
    assert vendored["source"].endswith(f"/{vendored['version']}/deploy/crds")
    assert set(vendored["schemas"]) == {"Certificate", "Issuer"}


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_every_object_lives_in_a_namespace_the_deployment_creates(directory: Path) -> None:
    objects = build(directory)
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    assert namespaces == {SCHEDULER_NS, AGENT_NS}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, kustomize.object_id(obj)


# -- the scheduler --------------------------------------------------------------


def scheduler() -> dict[str, Any]:
    return find(build(BASE), "Deployment", "tessera-scheduler")


def test_the_scheduler_runs_several_replicas_behind_a_disruption_budget() -> None:
    objects = build(BASE)
    deployment = find(objects, "Deployment", "tessera-scheduler")
    pdb = find(objects, "PodDisruptionBudget", "tessera-scheduler")
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A drain takes one replica at a time and leaves at least one serving.
    assert pdb["spec"]["maxUnavailable"] == 1 < replicas
    # A rollout adds the new replica before taking an old one away.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_scheduler_replicas_share_one_redis_from_a_secret() -> None:
    redis_url = env_of(container(scheduler(), "scheduler"))["REDIS_URL"]
    ref = redis_url["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("tessera-redis", "url")
    assert not ref.get("optional", False)


def run_entrypoint(c: dict[str, Any], tmp_path: Path, redis_url: str) -> tuple[int, str, str]:
    """Run the container's command and args with a stand-in tessera-scheduler on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "called"
    stand_in = bin_dir / "tessera-scheduler"
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(called))}\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "REDIS_URL": redis_url}
    done = subprocess.run(
        [*c["command"], *c.get("args", [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    args = called.read_text() if called.exists() else ""
    return done.returncode, args, done.stderr


def test_a_scheduler_without_redis_url_stops_instead_of_starting_its_own_valkey(
    tmp_path: Path,
) -> None:
    c = container(scheduler(), "scheduler")
    code, args, stderr = run_entrypoint(c, tmp_path, redis_url="")
    assert code == 2
    assert args == ""
    assert "REDIS_URL is empty" in stderr
    code, args, _ = run_entrypoint(c, tmp_path, redis_url="rediss://:pw@store:6379/0")
    assert code == 0
    assert args.splitlines() == c["args"]


def test_the_scheduler_is_probed_on_healthz_and_readyz_of_its_https_listener() -> None:
    c = container(scheduler(), "scheduler")
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["https"] == port_of(env["TESSERA_HTTP_LISTEN"]["value"])
    assert ports["grpc"] == port_of(env["TESSERA_LISTEN"]["value"])
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = c[probe]["httpGet"]
        # Served over TLS with the scheduler's TLS directory; the kubelet
        # sends no client certificate, which these two paths do not need.
        assert (get["path"], get["port"], get["scheme"]) == (path, "https", "HTTPS"), probe


def test_the_scheduler_service_exposes_its_grpc_and_https_ports() -> None:
    objects = build(BASE)
    service = find(objects, "Service", "tessera-scheduler")
    c = container(find(objects, "Deployment", "tessera-scheduler"), "scheduler")
    names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == names == {"grpc", "https"}
    pod_labels = find(objects, "Deployment", "tessera-scheduler")["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= pod_labels["labels"].items()


def tls_dir_volume(workload: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """The volume mounted where the container's TESSERA_TLS_DIR points."""
    path = env_of(c)["TESSERA_TLS_DIR"]["value"]
    mount = mount_at(c, path)
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees a renewed certificate"
    return volume(workload, mount["name"])


def test_the_scheduler_reads_cert_managers_secret_as_a_tessera_tls_directory() -> None:
    objects = build(BASE)
    deployment = find(objects, "Deployment", "tessera-scheduler")
    secret = tls_dir_volume(deployment, container(deployment, "scheduler"))["secret"]
    layout = {item["key"]: item["path"] for item in secret["items"]}
    assert layout == {"ca.crt": "ca.pem", "tls.crt": "cert.pem", "tls.key": "key.pem"}
    certificate = find(objects, "Certificate", "tessera-scheduler")
    assert certificate["spec"]["secretName"] == secret["secretName"]
    assert Identity.parse(certificate["spec"]["uris"][0]).role is Role.SCHEDULER


# -- the agent ------------------------------------------------------------------


def agent() -> dict[str, Any]:
    return find(build(BASE), "DaemonSet", "tessera-agent")


def host_path_mounted_at(workload: dict[str, Any], c: dict[str, Any], path: str) -> str:
    """The host path behind the container's mount at ``path``."""
    host_path: str = volume(workload, mount_at(c, path)["name"])["hostPath"]["path"]
    return host_path


def test_the_agent_daemonset_mounts_sys_dev_vfio_and_its_state_dir_from_the_host() -> None:
    daemonset = agent()
    c = container(daemonset, "agent")
    assert host_path_mounted_at(daemonset, c, "/sys") == "/sys"
    assert host_path_mounted_at(daemonset, c, "/dev/vfio") == "/dev/vfio"
    # The agent writes both: binding drivers, enabling VFs, creating mdevs.
    assert not mount_at(c, "/sys").get("readOnly", False)
    state_dir = env_of(c)["TESSERA_AGENT_STATE_DIR"]["value"]
    assert host_path_mounted_at(daemonset, c, state_dir) == state_dir
    assert not mount_at(c, state_dir).get("readOnly", False)
    assert c["securityContext"]["privileged"] is True
    assert c["securityContext"]["runAsUser"] == 0


def test_the_agent_runs_only_on_nodes_the_operator_labelled() -> None:
    assert pod_spec(agent())["nodeSelector"]["tessera/agent"] == "true"


def test_the_agent_stays_off_the_host_network_where_network_policy_cannot_reach() -> None:
    assert not pod_spec(agent()).get("hostNetwork", False)


def field_ref(c: dict[str, Any], var: str) -> str:
    path: str = env_of(c)[var]["valueFrom"]["fieldRef"]["fieldPath"]
    return path


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of an argument list."""
    assert len(args) % 2 == 0, args
    return dict(zip(args[::2], args[1::2], strict=True))


def test_each_agent_registers_as_its_node_at_its_pod_address() -> None:
    c = container(agent(), "agent")
    assert c["command"] == ["tessera-agent", "run"]
    flags = flag_values(c["args"])
    assert flags["--host-id"] == "$(NODE_NAME)"
    assert field_ref(c, "NODE_NAME") == "spec.nodeName"
    assert flags["--advertise"] == "$(POD_IP)"
    assert field_ref(c, "POD_IP") == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_of(flags["--listen"]) == ports["agent"]


def test_each_agent_reads_its_node_certificate_from_the_host() -> None:
    daemonset = agent()
    c = container(daemonset, "agent")
    tls = tls_dir_volume(daemonset, c)
    assert tls["hostPath"]["type"] == "Directory"


def test_agents_dial_the_scheduler_service() -> None:
    objects = build(BASE)
    c = container(find(objects, "DaemonSet", "tessera-agent"), "agent")
    host, _, port = env_of(c)["TESSERA_SCHEDULER"]["value"].rpartition(":")
    service = find(objects, "Service", "tessera-scheduler")
    meta = service["metadata"]
    assert host == f"{meta['name']}.{meta['namespace']}.svc"
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}


# -- who reaches whom -------------------------------------------------------------


def labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not evaluated here"
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


class Network:
    """Kubernetes NetworkPolicy semantics for ingress, over one build's policies."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        self.namespace_labels = {
            o["metadata"]["name"]: {
                **o["metadata"].get("labels", {}),
                "kubernetes.io/metadata.name": o["metadata"]["name"],
            }
            for o in objects
            if o["kind"] == "Namespace"
        }

    def _peer_matches(
        self, peer: Mapping[str, Any], policy_ns: str, src_ns: str, src: Mapping[str, str]
    ) -> bool:
        if "ipBlock" in peer:
            return True  # an address range may hold any pod: counted as allowing all
        if "namespaceSelector" in peer:
            ns_labels = self.namespace_labels.get(src_ns, {"kubernetes.io/metadata.name": src_ns})
            if not labels_match(peer["namespaceSelector"], ns_labels):
                return False
        elif src_ns != policy_ns:
            return False
        return "podSelector" not in peer or labels_match(peer["podSelector"], src)

    def allows(
        self,
        src_ns: str,
        src: Mapping[str, str],
        dst_ns: str,
        dst: Mapping[str, str],
        port: int,
    ) -> bool:
        """Whether a pod may open a TCP connection to another's ``port``."""
        selecting = [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == dst_ns
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            and labels_match(p["spec"]["podSelector"], dst)
        ]
        if not selecting:
            return True
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                if peers and not any(
                    self._peer_matches(peer, dst_ns, src_ns, src) for peer in peers
                ):
                    continue
                ports = rule.get("ports")
                if not ports or any(
                    p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port)
                    for p in ports
                ):
                    return True
        return False


def pod_labels(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = find(objects, kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


SCHEDULER_POD = {NAME_LABEL: "tessera-scheduler"}
STRANGER = {NAME_LABEL: "stranger"}


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_agents_are_reachable_only_from_the_scheduler(directory: Path) -> None:
    objects = build(directory)
    network = Network(objects)
    scheduler_pod = pod_labels(objects, "Deployment", "tessera-scheduler")
    agent_pod = pod_labels(objects, "DaemonSet", "tessera-agent")
    port = container(find(objects, "DaemonSet", "tessera-agent"), "agent")["ports"][0]
    agent_port = port["containerPort"]
    assert network.allows(SCHEDULER_NS, scheduler_pod, AGENT_NS, agent_pod, agent_port)
    denied = [
        (SCHEDULER_NS, STRANGER),  # any other pod of the scheduler's namespace
        (AGENT_NS, agent_pod),  # another agent
        (AGENT_NS, SCHEDULER_POD),  # a look-alike beside the agents
        ("default", SCHEDULER_POD),  # a look-alike anywhere else
    ]
    for src_ns, src in denied:
        assert not network.allows(src_ns, src, AGENT_NS, agent_pod, agent_port), (src_ns, src)
    # Not even the scheduler on another port.
    assert not network.allows(SCHEDULER_NS, scheduler_pod, AGENT_NS, agent_pod, agent_port + 1)


def test_the_scheduler_takes_calls_from_anywhere_on_its_two_ports_only() -> None:
    objects = build(BASE)
    network = Network(objects)
    scheduler_pod = pod_labels(objects, "Deployment", "tessera-scheduler")
    c = container(find(objects, "Deployment", "tessera-scheduler"), "scheduler")
    for port in (p["containerPort"] for p in c["ports"]):
        assert network.allows("default", STRANGER, SCHEDULER_NS, scheduler_pod, port)
    assert not network.allows("default", STRANGER, SCHEDULER_NS, scheduler_pod, 6379)


def test_only_the_scheduler_reaches_the_bundled_valkey() -> None:
    objects = build(BUNDLED_VALKEY)
    network = Network(objects)
    scheduler_pod = pod_labels(objects, "Deployment", "tessera-scheduler")
    valkey_pod = pod_labels(objects, "StatefulSet", "tessera-valkey")
    assert network.allows(SCHEDULER_NS, scheduler_pod, SCHEDULER_NS, valkey_pod, 6379)
    agent_pod = pod_labels(objects, "DaemonSet", "tessera-agent")
    for src_ns, src in ((AGENT_NS, agent_pod), (SCHEDULER_NS, STRANGER), ("default", STRANGER)):
        assert not network.allows(src_ns, src, SCHEDULER_NS, valkey_pod, 6379), (src_ns, src)


# -- the bundled Valkey -------------------------------------------------------------


def valkey_config(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The directives of the bundled Valkey's config file (the last of each wins)."""
    text = find(objects, "ConfigMap", "tessera-valkey-config")["data"]["valkey.conf"]
    settings: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings[key.lower()] = value.strip()
    return settings


def test_valkey_keeps_every_acknowledged_write_and_never_evicts() -> None:
    objects = build(BUNDLED_VALKEY)
    settings = valkey_config(objects)
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "always"
    assert settings["maxmemory-policy"] == "noeviction"
    statefulset = find(objects, "StatefulSet", "tessera-valkey")
    server = container(statefulset, "valkey")
    # The data directory is the claim every restart gets back.
    data = mount_at(server, settings["dir"])["name"]
    assert data in {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}


def test_valkey_runs_the_config_of_its_configmap_with_the_password_added() -> None:
    statefulset = find(build(BUNDLED_VALKEY), "StatefulSet", "tessera-valkey")
    server = container(statefulset, "valkey")
    assert server["command"][0] == "valkey-server"
    config_path = server["command"][1]
    init = container(statefulset, "config")
    script = init["command"][-1]
    source = mount_at(init, "/etc/valkey")
    assert volume(statefulset, source["name"])["configMap"]["name"] == "tessera-valkey-config"
    assert f"cp /etc/valkey/valkey.conf {config_path}" in script
    assert f'requirepass %s\\n\' "$VALKEY_PASSWORD" >> {config_path}' in script
    password = env_of(init)["VALKEY_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (password["name"], password["key"]) == ("tessera-redis", "password")
    # In memory, never on a disk of the node.
    run_volume = volume(statefulset, mount_at(server, str(Path(config_path).parent))["name"])
    assert run_volume["emptyDir"]["medium"] == "Memory"


def test_valkey_speaks_only_mutual_tls() -> None:
    settings = valkey_config(build(BUNDLED_VALKEY))
    assert settings["port"] == "0"
    assert settings["tls-port"] == "6379"
    assert settings["tls-auth-clients"] == "yes"


def test_the_readme_points_the_scheduler_at_a_name_in_valkeys_certificate() -> None:
    objects = build(BUNDLED_VALKEY)
    urls = re.findall(r"url=['\"]?(rediss://[^'\"\s]+)", DEPLOY_README.read_text())
    assert urls, "deploy/README.md shows the Secret tessera-redis for the bundled Valkey"
    host = re.sub(r"^rediss://[^@]*@", "", urls[0]).partition(":")[0]
    statefulset = find(objects, "StatefulSet", "tessera-valkey")
    meta = statefulset["metadata"]
    assert host == f"{meta['name']}-0.{statefulset['spec']['serviceName']}.{meta['namespace']}.svc"
    certificate = find(objects, "Certificate", "tessera-valkey")
    assert host in certificate["spec"]["dnsNames"]


# -- identities ---------------------------------------------------------------------


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_every_certificate_carries_one_tessera_identity_of_a_known_role(directory: Path) -> None:
    objects = build(directory)
    issuers = {o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"}
    certificates = [o for o in objects if o["kind"] == "Certificate"]
    assert certificates
    for certificate in certificates:
        spec = certificate["spec"]
        # Exactly one URI SAN, spiffe://tessera/<role>/<name>; parse refuses
        # any role the scheduler does not know.
        (uri,) = spec["uris"]
        identity = Identity.parse(uri)
        assert identity.role in set(Role)
        # The DNS SAN peers verify, and for schedulers the one every client checks.
        assert identity.dns_name in spec["dnsNames"]
        if identity.role is Role.SCHEDULER:
            assert SCHEDULER_DNS_NAME in spec["dnsNames"]
        # Every Tessera process both serves and calls.
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["privateKey"]["algorithm"] == "ECDSA"
        assert spec["issuerRef"]["kind"] == "Issuer"
        assert spec["issuerRef"]["name"] in issuers


def test_all_identities_come_from_one_ca() -> None:
    objects = build(BUNDLED_VALKEY)
    (issuer,) = [o for o in objects if o["kind"] == "Issuer"]
    assert issuer["spec"]["ca"]["secretName"] == "tessera-ca"


# -- pod security -------------------------------------------------------------------


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_only_the_agent_is_privileged(directory: Path) -> None:
    objects = build(directory)
    namespaces = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Namespace"}
    enforce = "pod-security.kubernetes.io/enforce"
    assert namespaces[SCHEDULER_NS]["metadata"]["labels"][enforce] == "restricted"
    assert namespaces[AGENT_NS]["metadata"]["labels"][enforce] == "privileged"
    for w in workloads(objects):
        spec = pod_spec(w)
        # No workload calls the Kubernetes API, and Service links would
        # shadow TESSERA_* settings with variables of Kubernetes' own.
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        if w["metadata"]["namespace"] == AGENT_NS:
            continue
        # The restricted Pod Security Standard.
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


# -- settings and programs ----------------------------------------------------------


def program_of(c: dict[str, Any]) -> str:
    """The console script a Tessera container runs (directly, or exec'd by its shell guard)."""
    command = c["command"]
    if command[:2] == ["/bin/sh", "-c"]:
        execs = re.findall(r"^\s*exec (\S+)", command[2], flags=re.MULTILINE)
        assert len(execs) == 1, command
        return str(execs[0])
    return str(command[0])


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_containers_run_the_wheels_console_scripts_at_the_projects_version(
    directory: Path,
) -> None:
    found = list(tessera_containers(build(directory)))
    assert {program_of(c) for c in found} == {"tessera-scheduler", "tessera-agent"}
    for c in found:
        assert program_of(c) in programs.console_scripts()
        assert c["image"] == f"tessera:{programs.version()}"


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=build_id)
def test_every_setting_passed_is_one_the_program_reads(directory: Path) -> None:
    for c in tessera_containers(build(directory)):
        source = programs.script_source(program_of(c))
        args = " ".join(c.get("args", []))
        for name in env_of(c):
            if f"$({name})" in args:
                continue  # only there to be expanded into an argument
            assert f'"{name}"' in source, f"{program_of(c)} never reads {name}"
        for flag in (a for a in c.get("args", []) if a.startswith("--")):
            assert f'"{flag}"' in source, f"{program_of(c)} has no flag {flag}"


# -- the image ----------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Containerfile, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = []
    for line in logical:
        instruction, _, rest = " ".join(line.split()).partition(" ")
        out.append((instruction.upper(), rest))
    return out


def test_the_containerfile_copies_only_paths_of_the_repository() -> None:
    copies = [rest for op, rest in containerfile_instructions() if op in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = shlex.split(rest)
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"Containerfile copies {source}, which is not there"


def test_the_image_installs_the_wheel_and_runs_its_scripts_unprivileged() -> None:
    instructions = containerfile_instructions()
    stages = [rest for op, rest in instructions if op == "FROM"]
    assert len(stages) == 2
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"].endswith("/python:3.11-slim-bookworm")
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = instructions[last_from:]
    installs = " ".join(rest for op, rest in final if op == "RUN")
    assert f"--no-index --find-links /wheels {programs.pyproject()['project']['name']}" in installs
    (user,) = [rest for op, rest in final if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (cmd,) = [rest for op, rest in final if op == "CMD"]
    assert shlex.split(cmd.strip("[]").replace(",", " "))[0] in programs.console_scripts()


def test_the_containerfile_copies_every_folder_the_wheels_are_built_from() -> None:
    copied = set()
    for op, rest in containerfile_instructions():
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        if op == "COPY":
            copied |= {w.rstrip("/") for w in words[:-1]}
    # The scheduler's distribution maps these folders in; the client's is its own folder.
    needed = set(programs.pyproject()["tool"]["setuptools"]["package-dir"].values())
    needed = {folder.split("/")[0] for folder in needed} | {"clients/python"}
    assert needed <= copied, f"the image build misses {sorted(needed - copied)}"
