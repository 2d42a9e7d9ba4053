"""deploy/ validated offline: both overlays build with kustomize (and refuse to build without their secrets),
every standard object passes ``kubernetes-validate --strict`` at the Kubernetes versions aex
supports, and what aex needs of them holds: real settings names and commands, a pool per
queue that drains within its grace period, non-root read-only pods, PodDisruptionBudgets,
the NetworkPolicy's who-talks-to-whom, Secrets that are never committed, and Redis's
persistence, eviction policy and TLS. (KEDA's and the Prometheus Operator's objects:
test_custom_resources.py; Redis's configuration run for real: test_redis_config.py.)"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from jobs.crypto import cipher_from_settings
from jobs.queues import QUEUE_NAMES, JobKind
from jobs.settings import Settings
from jobs.webhooks import parse_callback_secret
from tests.support import REPO_ROOT
from tests.support.kube import DEPLOY, NAMESPACE, OVERLAYS, kustomize, of_kind, one, read_env_file

# The oldest Kubernetes aex's manifests are checked against, and the newest kubernetes-validate
# (constraints.txt) knows: docs/deploy.md states the same range.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Seconds a worker's grace period leaves beyond its jobs' time limit (writing the end, the callback).
GRACE_MARGIN_SECONDS = 30
STANDARD_GROUPS = {"v1", "apps", "policy", "autoscaling", "networking.k8s.io"}
REDIS_PORT = 6380


def standard(docs):
    return [d for d in docs if d["apiVersion"].split("/")[0] in STANDARD_GROUPS]


def containers(deployment):
    return deployment["spec"]["template"]["spec"]["containers"]


def env_of(deployment, config) -> dict[str, str]:
    """The container's environment: the ConfigMap it loads, then its own env (values only)."""
    (c,) = containers(deployment)
    env = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config[source["configMapRef"]["name"]])
    env.update({e["name"]: e.get("value") for e in c.get("env", [])})
    return env


def workers(docs):
    return [
        d
        for d in of_kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_standard_object_passes_kubernetes_validate_strict(rendered, tmp_path, overlay, version):
    docs = standard(rendered[overlay])
    assert {d["kind"] for d in docs} >= {
        "Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    files = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    # The same check on an object with a field Kubernetes does not have must fail: --strict bites.
    bad = yaml.safe_load(Path(files[[d["kind"] for d in docs].index("Deployment")]).read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriod"] = 900
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    out = subprocess.run(
        [str(validate), "--strict", "--quiet", "-k", version, *files], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    refused = subprocess.run(
        [str(validate), "--strict", "--quiet", "-k", version, str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "terminationGracePeriod" in refused.stdout + refused.stderr


def test_no_overlay_builds_without_its_secrets(tmp_path):
    """Nothing to apply with a placeholder key: without make-secrets' files the build fails."""
    import shutil

    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("*.env", "*.crt", "*.key"))
    for overlay in OVERLAYS:
        built = kustomize(copy / "overlays" / overlay)
        assert built.returncode != 0 and "secrets/aex.env" in built.stderr, built.stderr


def test_no_secret_is_committed():
    tracked = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "deploy/base/secrets/.gitignore" in tracked
    leaked = [f for f in tracked if f.startswith("deploy/base/secrets/") and not f.endswith(".gitignore")]
    assert not leaked, leaked
    for path in tracked:
        text = (REPO_ROOT / path).read_text(errors="replace")
        assert "PRIVATE KEY-----" not in text and "whsec_" + "A" not in text, path


def test_secrets_made_by_make_secrets_are_what_aex_and_redis_need(deploy_copy, rendered):
    secrets = deploy_copy / "base" / "secrets"
    aex, redis_auth = read_env_file(secrets / "aex.env"), read_env_file(secrets / "redis.env")
    assert set(aex) == {"AEX_REDIS_URL", "AEX_DATA_KEY", "AEX_CALLBACK_SECRET"}
    cipher_from_settings(Settings(data_key=aex["AEX_DATA_KEY"]).data_key)  # a valid data key
    assert len(parse_callback_secret(aex["AEX_CALLBACK_SECRET"])) == 32
    url = urlsplit(aex["AEX_REDIS_URL"])
    assert url.scheme == "rediss" and url.username == "aex" and url.password == redis_auth["AEX_REDIS_PASSWORD"]
    assert url.hostname == f"aex-redis.{NAMESPACE}.svc.cluster.local" and url.port == REDIS_PORT
    # The CA the URL names is where the API and worker pods mount it.
    ca_path = parse_qs(url.query)["ssl_ca_certs"][0]
    for overlay in OVERLAYS:
        for deployment in of_kind(rendered[overlay], "Deployment"):
            (c,) = containers(deployment)
            mount = next(m for m in c["volumeMounts"] if m["name"] == "redis-ca")
            assert ca_path == f"{mount['mountPath']}/ca.crt", deployment["metadata"]["name"]
    # Redis's certificate: signed by that CA, for the service's names.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((secrets / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((secrets / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert {"aex-redis", url.hostname} <= set(names)
    assert not (secrets / "ca.key").exists() and not (secrets / "ca.srl").exists()
    # It never overwrites secrets that exist (a new data key would lose everything sealed with the old).
    again = subprocess.run(["bash", str(deploy_copy / "make-secrets")], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr
    assert read_env_file(secrets / "aex.env") == aex


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_commands_are_aex_s_own(rendered, overlay):
    docs = rendered[overlay]
    config = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    secret_keys = {
        d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {})) for d in of_kind(docs, "Secret")
    }
    fields = {f"AEX_{name.upper()}" for name in Settings.model_fields}
    for deployment in of_kind(docs, "Deployment"):
        (c,) = containers(deployment)
        names = set(env_of(deployment, config))
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                names |= secret_keys[source["secretRef"]["name"]]
        unknown = sorted(n for n in names if n.startswith("AEX_") and n not in fields)
        assert not unknown, f"{deployment['metadata']['name']}: {unknown} are not aex settings (jobs/settings.py)"
        Settings(**{k[4:].lower(): v for k, v in env_of(deployment, config).items() if k.startswith("AEX_")})
        # The command is aex's and its options parse (--help after them: nothing runs).
        assert c["command"][0] == "aex", c["command"]
        from aex.cli import app

        result = CliRunner().invoke(app, [*c["command"][1:], "--help"])
        assert result.exit_code == 0, (c["command"], result.output)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_worker_pool_per_queue_drains_within_its_grace_period(rendered, overlay):
    docs = rendered[overlay]
    config = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    pools = {}
    for deployment in workers(docs):
        settings = Settings(**{k[4:].lower(): v for k, v in env_of(deployment, config).items() if k.startswith("AEX_")})
        (kind,) = settings.queues
        pools[kind] = deployment
        (c,) = containers(deployment)
        assert c["command"][:2] == ["aex", "worker"] and "--burst" not in c["command"]
        # SIGTERM lets the jobs in hand finish (tests/worker/test_drain.py): the grace period
        # covers the longest time limit of what this pool takes, plus a margin.
        limits = [settings.classify_timeout] + ([settings.explain_timeout] if kind == "explain" else [])
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= max(limits) + GRACE_MARGIN_SECONDS, (deployment["metadata"]["name"], grace, limits)
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "gpu" else None), (overlay, c["resources"])
    assert set(pools) == {k.value for k in JobKind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_on_a_read_only_root(rendered, overlay):
    docs = rendered[overlay]
    templates = [d["spec"]["template"] for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")]
    for template in templates:
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod.get("runAsUser", 0) != 0
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert writable in ({"/tmp"}, {"/data"}), (c["name"], writable)  # aex: /tmp; Redis: its data
    (namespace,) = of_kind(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_the_api_autoscaler(rendered, overlay):
    docs = rendered[overlay]
    budgets = of_kind(docs, "PodDisruptionBudget")
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, deployment["metadata"]["name"]
    hpa = one(docs, "HorizontalPodAutoscaler", "aex-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "aex-api" and hpa["spec"]["minReplicas"] >= 2
    assert one(docs, "PodDisruptionBudget", "aex-api")["spec"]["minAvailable"] >= 1


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peers(rules) -> list[dict]:
    return [peer for rule in rules for peer in rule.get("from", rule.get("to", []))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_only_api_workers_and_keda_reach_redis(rendered, overlay):
    docs = rendered[overlay]
    policies = of_kind(docs, "NetworkPolicy")
    labels = {
        name: {"app.kubernetes.io/component": name}
        for name in ("api", "worker", "redis")  # every aex pod carries its component label
    }
    # Default deny, both ways, for every pod; only DNS may go out.
    deny = one(docs, "NetworkPolicy", "aex-default-deny")
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and [p["port"] for p in deny["spec"]["egress"][0]["ports"]] == [53, 53]

    def applying(component):
        return [
            p for p in policies if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels[component])
        ]

    # Redis: from the API, the workers and KEDA's operator, on its TLS port only; nothing out.
    (redis,) = applying("redis")
    assert redis["spec"]["policyTypes"] == ["Ingress"]
    sources = _peers(redis["spec"]["ingress"])
    assert [s["podSelector"]["matchLabels"] for s in sources] == [
        labels["api"],
        labels["worker"],
        {"app": "keda-operator"},
    ]
    assert sources[2]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert [p["port"] for r in redis["spec"]["ingress"] for p in r["ports"]] == [REDIS_PORT]
    # Workers: no ingress at all; out to Redis and the PACS only.
    (worker,) = applying("worker")
    assert "ingress" not in worker["spec"] and "Ingress" in worker["spec"]["policyTypes"]
    out = worker["spec"]["egress"]
    assert (
        out[0]["to"] == [{"podSelector": {"matchLabels": labels["redis"]}}] and out[0]["ports"][0]["port"] == REDIS_PORT
    )
    assert len(out) == 2 and list(out[1]["to"][0]) == ["ipBlock"]  # the PACS, by address
    # The API: in on its port; out to Redis only.
    (api,) = applying("api")
    assert [p["port"] for r in api["spec"]["ingress"] for p in r["ports"]] == [8000]
    assert _peers(api["spec"]["egress"]) == [{"podSelector": {"matchLabels": labels["redis"]}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_every_write_never_evicts_and_speaks_tls_only(rendered, overlay):
    docs = rendered[overlay]
    conf = one(docs, "ConfigMap", "aex-redis-config")["data"]["redis.conf"]
    directives = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    assert directives["appendonly"] == "yes" and directives["appendfsync"] == "always"
    assert directives["maxmemory-policy"] == "noeviction" and directives["port"] == "0"
    assert directives["tls-port"] == str(REDIS_PORT) and directives["user"] == "default off"
    sts = one(docs, "StatefulSet", "aex-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    # maxmemory below the memory limit: Redis refuses writes before it is OOM-killed.
    assert c["resources"]["limits"]["memory"] == "2Gi" and directives["maxmemory"] == "1536mb"
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]} == {
        "/data": "data",
        "/etc/redis": "config",
        "/tls": "tls",
    }
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    service = one(docs, "Service", "aex-redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [REDIS_PORT]
    # The keda ACL user reads the queues' lengths and nothing else (run for real: test_redis_config.py).
    keda = c["command"][c["command"].index("keda") :]
    patterns = [p[1:] for p in keda if p.startswith("~")]
    assert "resetkeys" in keda and patterns == ["rq:queue:*"] and "-@all" in keda
    assert all(fnmatch.fnmatchcase(f"rq:queue:{name}", patterns[0]) for name in QUEUE_NAMES.values())
