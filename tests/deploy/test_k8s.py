"""deploy/k8s/ against the Kubernetes schemas (kubernetes-validate, bundled schemas, offline)
and against the code: probes, ports, settings, grace periods, selectors, sizing."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from ingester.app_main import HYPERCORN_GRACE_S
from tests.deploy.files import (
    K8S,
    app_routes,
    dockerfile_user,
    load_settings,
    load_yaml,
    load_yaml_documents,
    project_image,
    quantity,
    runtime_stage,
    setting_default,
    setting_env_names,
)

# The oldest Kubernetes the manifests are meant for, and the newest schemas bundled.
KUBERNETES_VERSIONS: Final = ("1.29", kubernetes_validate.latest_version())
# README "Benchmarks": ingester peak RSS with 64 concurrent 16 MiB uploads (defaults).
MEASURED_PEAK_RSS_BYTES: Final = 284.3e6
MEASURED_CONCURRENCY: Final = 64
# Values for the Secrets the Deployment references, to load the settings as a pod would.
SECRET_STAND_INS: Final = {"INGESTER_SE_CLIENT_ID": "ingester", "INGESTER_SE_CLIENT_SECRET": "x"}


def resources() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    found = []
    for name in kustomization["resources"]:
        found += load_yaml_documents(K8S / name)
    return found


def the(kind: str) -> dict[str, Any]:
    (resource,) = [r for r in resources() if r["kind"] == kind]
    return resource


def pod_spec() -> dict[str, Any]:
    spec = the("Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container() -> dict[str, Any]:
    (ingester,) = pod_spec()["containers"]
    assert isinstance(ingester, dict)
    return ingester


def config() -> dict[str, str]:
    data = the("ConfigMap")["data"]
    assert isinstance(data, dict)
    return data


def container_port(reference: str | int) -> int:
    for port in container()["ports"]:
        if reference in (port["name"], port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"no container port {reference!r}")


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(r["kind"] for r in resources())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for resource in resources():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{resource['kind']} {path}: {exc.message} (Kubernetes {version})")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = the("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_configmap_and_secrets_make_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    names = setting_env_names()
    secret_env = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container().get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert set(secret_env) == set(SECRET_STAND_INS)
    for name in [*config(), *secret_env]:
        assert name in names, f"{name} is not a setting"
    assert container()["envFrom"] == [
        {"configMapRef": {"name": the("ConfigMap")["metadata"]["name"]}}
    ]
    settings = load_settings(monkeypatch, {**config(), **SECRET_STAND_INS})
    assert settings.se_auth.value == "client_credentials"
    assert settings.redis_url, "replicas share registry and sagas through Redis"


def test_public_key_comes_from_a_secret_volume_that_can_rotate() -> None:
    key_path = PurePosixPath(config()["INGESTER_AUTH_PUBLIC_KEY_PATH"])
    mounts = {mount["mountPath"]: mount for mount in container()["volumeMounts"]}
    mount = mounts[str(key_path.parent)]
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees a rotated key"
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    assert "secretName" in volumes[mount["name"]]["secret"]


def test_probes_hit_routes_of_the_app_on_the_container_port() -> None:
    routes = app_routes()
    probes = {
        kind: container()[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == "/health/live"
    assert probes["startupProbe"]["path"] == "/health/live"
    assert probes["readinessProbe"]["path"] == "/health/ready"
    # The internal listener: the public port's connection cap and its short readiness
    # answer never decide a probe.
    port = int(config()["INGESTER_INTERNAL_PORT"])
    for probe in probes.values():
        assert probe["path"] in routes
        assert container_port(probe["port"]) == port


def test_ports_agree_with_settings_image_and_scrape_annotation() -> None:
    port = int(config()["INGESTER_PORT"])
    assert port == setting_default("port")
    assert container_port("http") == port
    assert runtime_stage().last("EXPOSE").args == str(port)
    internal = int(config()["INGESTER_INTERNAL_PORT"])
    assert internal != port
    assert container_port("internal") == internal
    # Metrics are scraped from the internal listener (the public /metrics is 404 then).
    annotations = the("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(internal)
    assert annotations["prometheus.io/path"] in app_routes()


def test_service_targets_the_container_port_of_the_deployment_pods() -> None:
    service = the("Service")["spec"]
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert container_port(port["targetPort"]) == int(config()["INGESTER_PORT"])
    # The internal listener stays inside the pod's network: not in the Service.
    assert container_port(port["targetPort"]) != int(config()["INGESTER_INTERNAL_PORT"])


def test_hpa_and_pdb_select_the_deployment() -> None:
    deployment = the("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = the("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = the("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # A drain can always proceed, and one replica stays to serve.
    assert pdb["maxUnavailable"] >= 1
    assert hpa["minReplicas"] > pdb["maxUnavailable"]


def test_termination_grace_covers_prestop_and_the_drain() -> None:
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    grace_s = float(config()["INGESTER_SHUTDOWN_GRACE_S"])
    assert pod_spec()["terminationGracePeriodSeconds"] > sleep_s + grace_s + HYPERCORN_GRACE_S
    strategy = the("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_resources_cover_the_measured_memory_at_the_configured_concurrency() -> None:
    requests, limits = container()["resources"]["requests"], container()["resources"]["limits"]
    assert int(config()["INGESTER_MAX_UPLOADS_IN_FLIGHT"]) <= MEASURED_CONCURRENCY
    assert quantity(requests["memory"]) >= MEASURED_PEAK_RSS_BYTES
    assert quantity(limits["memory"]) >= 1.5 * MEASURED_PEAK_RSS_BYTES
    assert quantity(limits["cpu"]) >= quantity(requests["cpu"]) >= 1


def test_spool_is_the_shared_read_write_many_claim_sized_for_every_replica() -> None:
    spool_dir = config()["INGESTER_SPOOL_DIR"]
    mounts = {mount["mountPath"]: mount for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    claim_name = volumes[mounts[spool_dir]["name"]]["persistentVolumeClaim"]["claimName"]
    claim = the("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == claim_name
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    size = quantity(claim["spec"]["resources"]["requests"]["storage"])
    max_replicas = the("HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    per_replica = int(config()["INGESTER_SPOOL_MAX_BYTES"]) + int(
        config()["INGESTER_SPOOL_KEEP_BYTES"]
    )
    # The idle tus data files are in the shared directory: counted once.
    shared = int(config()["INGESTER_TUS_KEEP_BYTES"])
    assert size >= max_replicas * per_replica + shared


def test_pod_runs_the_image_entry_point_as_its_user_with_a_read_only_root() -> None:
    assert container()["image"] == project_image()
    assert "command" not in container(), "keep the image's ENTRYPOINT (exec form)"
    assert container()["args"] == runtime_stage().last("CMD").exec_form()
    uid, gid = dockerfile_user()
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {mount["mountPath"] for mount in container()["volumeMounts"]}
