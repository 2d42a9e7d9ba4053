"""deploy/'s custom resources checked against the fields their projects document (kubernetes-validate knows only
Kubernetes' own objects): KEDA's ScaledObject and TriggerAuthentication (keda.sh/v1alpha1, the
ScaledObject specification, the redis and prometheus scalers and the authentication concepts of
KEDA 2.21's documentation) and the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1).

The schemas are this project's own: every field they allow is one the documentation names,
and no other (``additionalProperties: false``); a trigger's metadata is a map of strings (KEDA
refuses a number there, so ``listLength: 5`` fails where ``listLength: "5"`` passes). What KEDA
hands to the HPA (``advanced.horizontalPodAutoscalerConfig.behavior``) is checked as an
HPA's own behavior by ``kubernetes-validate --strict``. Then what aex needs of them: a
ScaledObject per queue on rq's list ``rq:queue:<name>``, a trigger that counts running jobs,
at least one warm worker, and references that resolve."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from jobs.queues import QUEUE_NAMES, JobKind
from jobs.settings import Settings
from tests.support.kube import NAMESPACE, OVERLAYS, of_kind, one

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
DIGITS = {"type": "string", "pattern": r"^[0-9]+$"}
NUMBER = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
BOOL_TEXT = {"type": "string", "enum": ["true", "false"]}
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": NAME, "namespace": NAME, "labels": STRING_MAP, "annotations": STRING_MAP},
}


def closed(properties: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(required), "properties": properties}


# The redis scaler ("Redis Lists"): its trigger metadata and the parameters a TriggerAuthentication may give it.
REDIS_METADATA = closed(
    {
        "address": {"type": "string", "pattern": r"^[^:]+:[0-9]+$"},
        "host": {"type": "string"},
        "port": DIGITS,
        "usernameFromEnv": {"type": "string"},
        "passwordFromEnv": {"type": "string"},
        "listName": {"type": "string"},
        "listLength": DIGITS,
        "activationListLength": DIGITS,
        "enableTLS": BOOL_TEXT,
        "unsafeSsl": BOOL_TEXT,
        "databaseIndex": DIGITS,
        "addressFromEnv": {"type": "string"},
        "hostFromEnv": {"type": "string"},
        "portFromEnv": {"type": "string"},
    },
    required=("listName", "listLength"),
)
REDIS_AUTH = {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}
PROMETHEUS_METADATA = closed(
    {
        "serverAddress": {"type": "string", "pattern": r"^https?://"},
        "query": {"type": "string"},
        "threshold": NUMBER,
        "activationThreshold": NUMBER,
        "namespace": {"type": "string"},
        "customHeaders": {"type": "string"},
        "ignoreNullValues": BOOL_TEXT,
        "queryParameters": {"type": "string"},
        "unsafeSsl": BOOL_TEXT,
        "timeout": {"type": "string"},
        "authModes": {"type": "string"},
    },
    required=("serverAddress", "query", "threshold"),
)
TRIGGER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "metadata"],
    "properties": {
        "type": {"enum": ["redis", "prometheus"]},  # the scalers deploy/ uses
        "name": NAME,
        "metadata": STRING_MAP,
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": closed(
            {"name": NAME, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
            required=("name",),
        ),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": "redis"}}}, "then": {"properties": {"metadata": REDIS_METADATA}}},
        {
            "if": {"properties": {"type": {"const": "prometheus"}}},
            "then": {"properties": {"metadata": PROMETHEUS_METADATA}},
        },
    ],
}
SCALED_OBJECT = closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": closed(
            {
                "scaleTargetRef": closed(
                    {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": NAME,
                        "envSourceContainerName": {"type": "string"},
                    },
                    required=("name",),
                ),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": closed(
                    {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                                "scalingModifiers",
                            ]
                        },
                    },
                    required=("failureThreshold", "replicas"),
                ),
                "advanced": closed(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": closed({"name": NAME, "behavior": {"type": "object"}}),
                        "scalingModifiers": closed(
                            {
                                "target": NUMBER,
                                "activationTarget": NUMBER,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                                "formula": {"type": "string"},
                            },
                            required=("target", "formula"),
                        ),
                    }
                ),
                "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
            },
            required=("scaleTargetRef", "triggers"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)
TRIGGER_AUTHENTICATION = closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": METADATA,
        "spec": closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": closed(
                        {"parameter": {"type": "string"}, "name": NAME, "key": {"type": "string"}},
                        required=("parameter", "name", "key"),
                    ),
                },
                "env": {
                    "type": "array",
                    "items": closed(
                        {"parameter": {"type": "string"}, "name": {"type": "string"}, "containerName": NAME},
                        required=("parameter", "name"),
                    ),
                },
            }
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)
SERVICE_MONITOR = closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": closed(
            {
                "selector": closed({"matchLabels": STRING_MAP}, required=("matchLabels",)),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "authorization": closed(
                                {
                                    "type": {"type": "string"},
                                    "credentials": closed(
                                        {"name": NAME, "key": {"type": "string"}}, required=("name", "key")
                                    ),
                                },
                                required=("credentials",),
                            ),
                        },
                        required=("port",),
                    ),
                },
            },
            required=("selector", "endpoints"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)
SCHEMAS = {
    "ScaledObject": SCALED_OBJECT,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION,
    "ServiceMonitor": SERVICE_MONITOR,
}
CUSTOM_GROUPS = {"keda.sh", "monitoring.coreos.com"}


def check(doc) -> None:
    jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]]).validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_use_only_documented_fields(rendered, overlay):
    custom = [d for d in rendered[overlay] if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert sorted(d["kind"] for d in custom) == [
        "ScaledObject",
        "ScaledObject",
        "ServiceMonitor",
        "TriggerAuthentication",
    ]
    for doc in custom:
        check(doc)


def test_the_schemas_refuse_what_keda_refuses(rendered):
    so = one(rendered["gpu"], "ScaledObject", "aex-worker-explain")
    redis = next(i for i, t in enumerate(so["spec"]["triggers"]) if t["type"] == "redis")

    def refused(change) -> None:
        bad = copy.deepcopy(so)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            check(bad)

    refused(lambda d: d["spec"]["triggers"][redis]["metadata"].update(listLength=1))  # a number, not a string
    refused(lambda d: d["spec"]["triggers"][redis]["metadata"].update(listLenght="1"))  # a misspelt parameter
    refused(lambda d: d["spec"]["triggers"][redis]["metadata"].pop("listName"))
    refused(lambda d: d["spec"].update(minReplicas=1))  # the HPA's word, not KEDA's
    refused(lambda d: d["spec"]["triggers"][redis].update(type="redis-lists"))


def test_what_keda_hands_the_hpa_is_a_valid_hpa_behavior(rendered, tmp_path):
    from tests.deploy.test_manifests import KUBERNETES_VERSIONS

    validate = Path(sys.executable).with_name("kubernetes-validate")
    for so in of_kind(rendered["gpu"], "ScaledObject"):
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": so["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": so["spec"]["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        path = tmp_path / f"{so['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(hpa))
        for version in KUBERNETES_VERSIONS:
            out = subprocess.run(
                [str(validate), "--strict", "--quiet", "-k", version, str(path)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_queue_scales_on_its_list_and_its_running_jobs(rendered, overlay):
    docs = rendered[overlay]
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    config = one(docs, "ConfigMap", "aex-config")["data"]
    secrets = {d["metadata"]["name"]: d for d in of_kind(docs, "Secret")}
    auths = {d["metadata"]["name"]: d for d in of_kind(docs, "TriggerAuthentication")}
    redis_service = one(docs, "Service", "aex-redis")
    scaled = {}
    for so in of_kind(docs, "ScaledObject"):
        spec = so["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        (c,) = target["spec"]["template"]["spec"]["containers"]
        env = {**config, **{e["name"]: e.get("value") for e in c.get("env", [])}}
        (kind,) = Settings(queues=env["AEX_QUEUES"]).queues
        scaled[kind] = so
        # At least one warm worker: the API refuses jobs of a queue no worker serves.
        assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] >= spec["minReplicaCount"]
        triggers = spec["triggers"]
        (redis,) = [t for t in triggers if t["type"] == "redis"]
        meta = redis["metadata"]
        assert meta["listName"] == f"rq:queue:{QUEUE_NAMES[JobKind(kind)]}"
        assert isinstance(meta["listLength"], str) and int(meta["listLength"]) >= 1
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"{redis_service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
        # Its credentials resolve to keys of the Secrets, and name only what the redis scaler takes.
        auth = auths[redis["authenticationRef"]["name"]]
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["parameter"] in REDIS_AUTH and ref["key"] in secrets[ref["name"]]["data"], ref
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"username", "password", "tls", "ca"}
        # A trigger that sees the jobs running, so busy workers are never scaled away.
        running = [
            t
            for t in triggers
            if t["type"] == "prometheus"
            and f'aex_jobs_running{{namespace="{NAMESPACE}",queue="{kind}"}}' in t["metadata"]["query"]
            and f'aex_queue_depth{{namespace="{NAMESPACE}",queue="{kind}"}}' in t["metadata"]["query"]
        ]
        assert len(running) == 1 and running[0]["metadata"]["ignoreNullValues"] == "false"
        # Cluster gauges, the same on every API replica: aggregated with max, never summed.
        for t in triggers:
            if t["type"] == "prometheus":
                assert "sum(" not in t["metadata"]["query"] and urlsplit(t["metadata"]["serverAddress"]).port
    assert set(scaled) == {k.value for k in JobKind}


def test_prometheus_scrapes_the_api_s_metrics_with_a_token(rendered):
    docs = rendered["gpu"]
    monitor = one(docs, "ServiceMonitor", "aex-api")
    service = one(docs, "Service", "aex-api")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]] and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "aex-metrics-token", "key": "token"}
