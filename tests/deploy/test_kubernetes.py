"""The Kubernetes base: schema-valid offline, self-consistent, and consistent with its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

import gateway.config as gc
from tests.deploy._files import (
    K8S_BASE,
    config_ports,
    fake_secret_env,
    k8s_base_resources,
    k8s_files,
    k8s_objects,
    load_yaml_docs,
    rel,
)

# Oldest release the manifests must work on (autoscaling/v2 and policy/v1 are GA there) and
# the newest the pinned schema package knows.
K8S_VERSIONS = ("1.27.0", latest_version())
CONFIG_PATH = "/etc/keystile/keystile.toml"
SECRET_NAME = "keystile-secrets"


@pytest.fixture(scope="module")
def objs() -> dict[str, dict[str, Any]]:
    return k8s_base_resources()


@pytest.fixture(scope="module")
def kust() -> dict[str, Any]:
    return load_yaml_docs(K8S_BASE / "kustomization.yaml")[0]


@pytest.fixture(scope="module")
def cfg(kust: dict[str, Any]) -> gc.Config:
    (gen,) = kust["configMapGenerator"]
    (name,) = gen["files"]
    assert name == "keystile.toml"
    return gc.load(K8S_BASE / name, env={})


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, o) for p in k8s_files() for o in k8s_objects(p) if o.get("kind") != "Kustomization"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("path", "obj"), _manifests(), ids=lambda v: rel(v) if isinstance(v, Path) else v["kind"]
)
def test_manifest_is_schema_valid(path: Path, obj: dict[str, Any], version: str) -> None:
    # Strict schemas reject unknown fields, so a misspelt key fails here rather than in a cluster.
    kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {},
            "template": {"spec": {"containers": [{"name": "x", "imagee": "y"}]}},
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_existing_files(kust: dict[str, Any]) -> None:
    listed = list(kust["resources"])
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        listed += gen.get("files", [])
    missing = [f for f in listed if not (K8S_BASE / f).is_file()]
    assert not missing


def test_every_manifest_in_base_is_listed_except_the_secret_example(kust: dict[str, Any]) -> None:
    yamls = {p.name for p in K8S_BASE.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == yamls - {"secret.example.yaml"}
    assert "secret.example.yaml" not in kust["resources"]
    assert not kust.get("secretGenerator"), "secrets are created out of band, not generated"


def test_expected_objects(objs: dict[str, dict[str, Any]]) -> None:
    assert {
        "Deployment/keystile",
        "Service/keystile",
        "Service/keystile-admin",
        "HorizontalPodAutoscaler/keystile",
        "PodDisruptionBudget/keystile",
        "Job/keystile-migrate",
    } <= set(objs)
    assert not [k for k in objs if k.startswith("Secret/")]
    assert objs["HorizontalPodAutoscaler/keystile"]["apiVersion"] == "autoscaling/v2"
    assert objs["PodDisruptionBudget/keystile"]["apiVersion"] == "policy/v1"


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_deployment_ports_match_config(objs: dict[str, dict[str, Any]], cfg: gc.Config) -> None:
    proxy, admin = config_ports(cfg)
    assert _ports(_container(objs["Deployment/keystile"])) == {"proxy": proxy, "admin": admin}
    assert gc.parse_listen(cfg.proxy.listen)[0] == "0.0.0.0"
    assert gc.parse_listen(cfg.admin.listen)[0] == "0.0.0.0"


def test_probes(objs: dict[str, dict[str, Any]]) -> None:
    c = _container(objs["Deployment/keystile"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_graceful_shutdown_budget(objs: dict[str, dict[str, Any]], cfg: gc.Config) -> None:
    spec = objs["Deployment/keystile"]["spec"]["template"]["spec"]
    cmd = _container(objs["Deployment/keystile"])["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.proxy.shutdown_timeout


def test_resources_set(objs: dict[str, dict[str, Any]]) -> None:
    for key in ("Deployment/keystile", "Job/keystile-migrate"):
        res = _container(objs[key])["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), key
        assert "memory" in res["limits"], key


def test_pod_security(objs: dict[str, dict[str, Any]]) -> None:
    for key in ("Deployment/keystile", "Job/keystile-migrate"):
        pod = objs[key]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, key
        assert pod["securityContext"].get("runAsUser", 1) != 0, key
        sc = _container(objs[key])["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, key
        assert sc["allowPrivilegeEscalation"] is False, key
        assert sc["capabilities"]["drop"] == ["ALL"], key


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_secrets_come_from_secret_refs(objs: dict[str, dict[str, Any]]) -> None:
    refs = _secret_refs(_container(objs["Deployment/keystile"]))
    for name in (gc.ADMIN_TOKENS_ENV, gc.HASH_SECRET_ENV, "KEYSTILE_STORE__URL"):
        assert name in refs, name
        assert refs[name]["name"] == SECRET_NAME
        assert not refs[name].get("optional", False), name
    job_refs = _secret_refs(_container(objs["Job/keystile-migrate"]))
    assert job_refs["KEYSTILE_STORE__URL"] == refs["KEYSTILE_STORE__URL"]


def test_secret_example_has_every_referenced_key(objs: dict[str, dict[str, Any]]) -> None:
    (example,) = k8s_objects(K8S_BASE / "secret.example.yaml")
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET_NAME
    provided = set(example.get("stringData", {})) | set(example.get("data", {}))
    for key in ("Deployment/keystile", "Job/keystile-migrate"):
        for env, ref in _secret_refs(_container(objs[key])).items():
            assert ref["key"] in provided, f"{key} {env}: key {ref['key']!r}"


def test_environment_loads_with_the_config(objs: dict[str, dict[str, Any]]) -> None:
    # What a pod would see: the ConfigMap plus its env (secrets replaced by well-formed values).
    env = fake_secret_env()
    for e in _container(objs["Deployment/keystile"]).get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["name"] == "KEYSTILE_STORE__URL":
            env[e["name"]] = "postgresql://keystile:pw@postgres:5432/keystile"
        elif e["name"] == "KEYSTILE_REDIS__URL":
            env[e["name"]] = "redis://:pw@redis:6379/0"
    cfg = gc.load(K8S_BASE / "keystile.toml", env=env)
    gc.load_secrets(cfg, env)
    assert urlsplit(cfg.store.url).scheme in ("postgresql", "postgres")


def test_config_volume_and_args(objs: dict[str, dict[str, Any]], kust: dict[str, Any]) -> None:
    (gen,) = kust["configMapGenerator"]
    for key, command in (("Deployment/keystile", "serve"), ("Job/keystile-migrate", "migrate")):
        pod = objs[key]["spec"]["template"]["spec"]
        c = _container(objs[key])
        assert c["args"] == [command, "--config", CONFIG_PATH], key
        assert c["image"] == _container(objs["Deployment/keystile"])["image"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        mount_dir, _, filename = CONFIG_PATH.rpartition("/")
        assert filename == gen["files"][0]
        assert volumes[mounts[mount_dir]]["configMap"]["name"] == gen["name"], key


def test_image_is_set_by_kustomize(objs: dict[str, dict[str, Any]], kust: dict[str, Any]) -> None:
    names = {i["name"] for i in kust.get("images", [])}
    assert _container(objs["Deployment/keystile"])["image"] in names


def test_selectors_and_targets(objs: dict[str, dict[str, Any]]) -> None:
    dep = objs["Deployment/keystile"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = _ports(_container(dep))
    for svc_key, port_name in (("Service/keystile", "proxy"), ("Service/keystile-admin", "admin")):
        svc = objs[svc_key]["spec"]
        assert svc.get("type", "ClusterIP") == "ClusterIP"
        assert svc["selector"].items() <= pod_labels.items()
        (port,) = svc["ports"]
        assert port["targetPort"] == port_name and port_name in ports
    pdb = objs["PodDisruptionBudget/keystile"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    target = objs["HorizontalPodAutoscaler/keystile"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "keystile")
    hpa = objs["HorizontalPodAutoscaler/keystile"]["spec"]
    assert hpa["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
