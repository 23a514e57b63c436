"""The CRD in crds/ and the spec parser must describe the same API.

The API server enforces the CRD; ``parse_spec`` enforces the same rules for manifests no API server has
seen (the ``check`` CLI) and for objects stored before a rule tightened. These tests pin the two
together: defaults, enums, bounds, and a shared list of invalid specs (tests/samples/invalid_specs.yaml)
that the e2e suite also applies to a real API server.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtp_oauth_operator.domain.spec import (
    CLOUDS,
    DEFAULT_WARN_BEFORE_DAYS,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    SpecError,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / f"{PLURAL}.{GROUP}.yaml"
SAMPLES = ROOT / "tests" / "samples"

MINIMAL: dict[str, Any] = {
    "username": "no-reply@contoso.onmicrosoft.com",
    "identity": {
        "tenantId": "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e",
        "clientId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
    },
}


def _load_crd() -> dict[str, Any]:
    with CRD_PATH.open() as f:
        crd: dict[str, Any] = yaml.safe_load(f)
    return crd


CRD = _load_crd()
VERSION_DEF: dict[str, Any] = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION_DEF["schema"]["openAPIV3Schema"]
SPEC_SCHEMA: dict[str, Any] = SCHEMA["properties"]["spec"]
STATUS_SCHEMA: dict[str, Any] = SCHEMA["properties"]["status"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, schema) for every property and list item below ``node``."""
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}" if path else name
        yield child_path, child
        yield from walk(child, child_path)
    if "items" in node:
        yield f"{path}[]", node["items"]
        yield from walk(node["items"], f"{path}[]")


def at(path: str) -> dict[str, Any]:
    """The schema of a dotted spec path, e.g. ``smtp.port``."""
    node = SPEC_SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node


def with_value(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(base if base is not None else MINIMAL)
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return spec


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: missing properties with a default get it, and
    defaulting continues inside the defaulted value (so ``smtp: default: {}`` fills smtp's defaults)."""
    if isinstance(value, dict):
        out = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(out[name], prop)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def cel_rules(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("x-kubernetes-validations") or [])


def regexes(rule: str) -> list[str]:
    return re.findall(r"r'([^']*)'", rule)


# ---------------------------------------------------------------------------------------------------------
# Shape of the CRD


def test_names_and_version() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    spec = CRD["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": PLURAL,
        "singular": "smtpoauthconfig",
        "shortNames": ["smtpoauth"],
        "categories": ["smtpoauth"],
    }
    assert [v["name"] for v in spec["versions"]] == [VERSION]
    assert VERSION_DEF["served"] is True
    assert VERSION_DEF["storage"] is True
    assert VERSION_DEF["subresources"] == {"status": {}}


def test_every_property_has_a_description() -> None:
    missing = [path for path, node in walk(SCHEMA) if not str(node.get("description", "")).strip()]
    assert not missing, f"properties without a description (kubectl explain shows it): {missing}"
    assert SCHEMA.get("description")


def test_schema_is_structural_and_bounded() -> None:
    problems = []
    for path, node in walk(SCHEMA):
        if "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: preserves unknown fields")
        if node.get("type") == "string" and path not in {"apiVersion", "kind"} and "maxLength" not in node:
            problems.append(f"{path}: string without maxLength")
        if node.get("type") == "array" and "maxItems" not in node:
            problems.append(f"{path}: list without maxItems")
        for rule in cel_rules(node):
            if not rule.get("message"):
                problems.append(f"{path}: CEL rule without a message: {rule['rule']}")
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(CRD)
    assert not problems, problems


def test_cel_rules_are_well_formed() -> None:
    """What can be checked without an API server: balanced brackets and quotes, known keys, regexes that
    compile. (The real compilation and cost check happens when the e2e suite installs the CRD.)"""
    for path, node in walk(SCHEMA):
        for rule in cel_rules(node):
            assert set(rule) <= {"rule", "message", "messageExpression", "fieldPath", "reason"}, path
            assert rule.get("reason", "FieldValueInvalid") in {
                "FieldValueInvalid",
                "FieldValueForbidden",
                "FieldValueRequired",
                "FieldValueDuplicate",
            }, path
            text = rule["rule"]
            stripped = re.sub(r"r?'[^']*'", "''", text)
            assert stripped.count("(") == stripped.count(")"), (path, text)
            assert text.count("'") % 2 == 0, (path, text)
            for rx in regexes(text):
                re.compile(rx)
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], (path, rule)


def test_status_conditions_follow_metav1_condition() -> None:
    conditions = STATUS_SCHEMA["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    props = item["properties"]
    assert props["status"]["enum"] == ["True", "False", "Unknown"]
    assert props["reason"]["pattern"] == "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert props["message"]["maxLength"] == 32768
    assert props["lastTransitionTime"]["format"] == "date-time"
    assert props["observedGeneration"]["format"] == "int64"


def test_status_fields() -> None:
    props = STATUS_SCHEMA["properties"]
    expected = {
        "observedGeneration": "integer",
        "conditions": "array",
        "tokenEndpoint": "string",
        "scope": "string",
        "smtpEndpoint": "string",
        "lastTestTime": "string",
        "lastTestDurationSeconds": "number",
        "nextTestTime": "string",
        "consecutiveFailures": "integer",
        "clientSecretExpiresAt": "string",
        "lastAlarm": "object",
        "alarmHistory": "array",
        "observedFingerprint": "string",
        "handledRecheck": "string",
        "clientCertificate": "object",
        "expirySource": "string",
        "expiryMismatch": "object",
        "appCredentials": "array",
        "renewal": "object",
        "testMessageTrigger": "string",
        "relay": "object",
    }
    assert {k: v["type"] for k, v in props.items()} == expected
    for name in ("lastTestTime", "nextTestTime", "clientSecretExpiresAt"):
        assert props[name]["format"] == "date-time"
    assert props["alarmHistory"]["maxItems"] == 20
    assert set(props["alarmHistory"]["items"]["properties"]) == {"type", "thresholdDays", "time", "message"}
    assert {"type", "thresholdDays", "time"} <= set(props["lastAlarm"]["properties"])
    assert props["lastAlarm"]["properties"]["sending"]["type"] == "boolean"
    assert set(props["relay"]["properties"]) == {"endpoint"}
    assert props["relay"]["properties"]["endpoint"]["maxLength"] == 260


def test_printer_columns() -> None:
    ready = '.status.conditions[?(@.type=="Ready")]'
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in VERSION_DEF["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Ready", "string", f"{ready}.status", 0),
        ("Reason", "string", f"{ready}.reason", 0),
        ("Expires", "string", ".status.clientSecretExpiresAt", 0),
        ("Age", "date", ".metadata.creationTimestamp", 0),
        ("Username", "string", ".spec.username", 1),
        ("SMTP", "string", ".status.smtpEndpoint", 1),
        ("Last Test", "date", ".status.lastTestTime", 1),
        ("Relay", "string", ".status.relay.endpoint", 1),
        ("Message", "string", f"{ready}.message", 1),
    ]


# ---------------------------------------------------------------------------------------------------------
# The CRD and the parser agree


def test_required_fields() -> None:
    assert SCHEMA["required"] == ["spec"]
    assert SPEC_SCHEMA["required"] == ["username", "identity"]
    assert at("identity")["required"] == ["tenantId", "clientId"]
    assert at("identity.clientCertificate")["required"] == ["secretRef"]
    assert at("identity.clientCertificate.secretRef")["required"] == ["name"]
    assert at("identity.clientSecret")["required"] == ["secretKeyRef"]
    assert at("identity.clientSecret.secretKeyRef")["required"] == ["name", "key"]


def test_crd_defaults_equal_parser_defaults() -> None:
    defaulted = apply_defaults(MINIMAL, SPEC_SCHEMA)
    assert defaulted == {
        **MINIMAL,
        "smtp": {"tls": "StartTLS", "connectionTimeoutSeconds": 60},
        "identity": {**MINIMAL["identity"], "cloud": "AzurePublic", "timeoutSeconds": 30},
        "recheckInterval": "1h",
        "alarms": {"warnBeforeDays": [30, 14, 7, 1]},
        "secretPolicy": "Warn",
    }
    assert parse_spec(defaulted) == parse_spec(MINIMAL)

    parsed = parse_spec(MINIMAL)
    assert parsed.implicit_tls is False
    assert parsed.connection_timeout == at("smtp.connectionTimeoutSeconds")["default"]
    assert parsed.cloud == at("identity.cloud")["default"]
    assert parsed.identity_timeout == at("identity.timeoutSeconds")["default"]
    assert parsed.recheck_interval.total_seconds() == 3600
    assert list(parsed.warn_before_days) == at("alarms.warnBeforeDays")["default"]
    assert tuple(at("alarms.warnBeforeDays")["default"]) == DEFAULT_WARN_BEFORE_DAYS
    assert parsed.secret_policy == SPEC_SCHEMA["properties"]["secretPolicy"]["default"]


@pytest.mark.parametrize("path", ["smtp.host", "smtp.port", "identity.authorityHost", "identity.scope"])
def test_derived_fields_have_no_default(path: str) -> None:
    assert "default" not in at(path)
    assert "derived" in at(path)["description"]


def test_derived_values_are_documented() -> None:
    """The descriptions of the derived fields list what the parser derives."""
    for name, cloud in CLOUDS.items():
        for path, value in (
            ("smtp.host", cloud.smtp_host),
            ("identity.authorityHost", cloud.authority_host),
            ("identity.scope", cloud.scope),
        ):
            description = " ".join(at(path)["description"].split())
            assert f"{name} {value}" in description, (path, name)
            parsed = parse_spec(with_value("identity.cloud", name))
            assert value.rstrip("/") in {parsed.smtp_host, parsed.authority_host, parsed.scope}
    assert "587" in at("smtp.port")["description"]
    assert "465" in at("smtp.port")["description"]
    assert parse_spec(MINIMAL).smtp_port == 587
    assert parse_spec(with_value("smtp", {"tls": "ImplicitTLS"})).smtp_port == 465


def _parser_choices(path: str) -> list[str]:
    """The allowed values the parser names when it rejects a value."""
    with pytest.raises(SpecError) as err:
        parse_spec(with_value(path, "NotAValue"))
    assert err.value.field == path
    choices = err.value.problem.removeprefix("must be one of ")
    return choices.split(", ")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("smtp.tls", ["StartTLS", "ImplicitTLS"]),
        ("identity.cloud", list(CLOUDS)),
        ("secretPolicy", ["Warn", "Require", "Ignore"]),
    ],
)
def test_enums_equal_parser_values(path: str, expected: list[str]) -> None:
    assert at(path)["enum"] == expected
    assert _parser_choices(path) == expected
    for value in expected:
        parse_spec(with_value(path, value))


@pytest.mark.parametrize(
    ("path", "lo", "hi"),
    [
        ("smtp.port", 1, 65535),
        ("smtp.connectionTimeoutSeconds", 1, 300),
        ("identity.timeoutSeconds", 1, 300),
        ("relay.messagesPerMinute", 1, 10_000),
        ("relay.recipientsPerDay", 1, 1_000_000),
    ],
)
def test_integer_bounds_agree(path: str, lo: int, hi: int) -> None:
    node = at(path)
    base = None
    if path.startswith("relay."):
        base = with_value("relay", {"enabled": True, "credentialsSecretRef": {"name": "alerts-relay"}})
    assert (node["minimum"], node["maximum"]) == (lo, hi)
    parse_spec(with_value(path, lo, base))
    parse_spec(with_value(path, hi, base))
    for bad in (lo - 1, hi + 1):
        with pytest.raises(SpecError) as err:
            parse_spec(with_value(path, bad, base))
        assert err.value.field == path


def test_list_bounds_agree() -> None:
    days = at("alarms.warnBeforeDays")
    assert days["x-kubernetes-list-type"] == "set"
    assert (days["items"]["minimum"], days["items"]["maximum"], days["maxItems"]) == (1, 3650, 10)
    parse_spec(with_value("alarms", {"warnBeforeDays": [3650, *range(1, 10)]}))
    notify = at("alarms.notify.to")
    assert notify["maxItems"] == 20
    parse_spec(with_value("alarms", {"notify": {"to": [f"a{i}@contoso.com" for i in range(20)]}}))


# Values of regex-checked fields, each with whether both sides must accept it. The CRD's CEL regexes are
# evaluated here with Python's re (close enough to RE2 for these patterns) against the parser's verdict.
REGEX_CASES: list[tuple[str, str, bool]] = [
    ("username", "no-reply@contoso.onmicrosoft.com", True),
    ("username", "no-reply", False),
    ("username", "a b@contoso.com", False),
    ("username", "a@b@c", False),
    ("identity.tenantId", "0d9b8c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e", True),
    ("identity.tenantId", "contoso.onmicrosoft.com", True),
    ("identity.tenantId", "contoso", False),
    ("identity.tenantId", "0d9b8c6e-1f2a-4b3c-9d8e", False),
    ("identity.clientId", "3F2504E0-4F89-11D3-9A0C-0305E82C3301", True),
    ("identity.clientId", "3f2504e04f8911d39a0c0305e82c3301", False),
    ("identity.authorityHost", "https://login.microsoftonline.com", True),
    ("identity.authorityHost", "https://127.0.0.1:8443/tenant-base/", True),
    ("identity.authorityHost", "http://login.microsoftonline.com", False),
    ("identity.authorityHost", "https://", False),
    ("proxy.url", "http://proxy.corp:3128", True),
    ("proxy.url", "http://proxy.corp:3128/", True),
    ("proxy.url", "http://user:p%40ss@proxy.corp:3128", True),
    ("proxy.url", "https://proxy.corp:3128/", False),
    ("proxy.url", "socks5://proxy.corp:1080", False),
    ("proxy.url", "http://proxy.corp:3128/path", False),
    ("testMessage.to", "ops@contoso.com", True),
    ("testMessage.to", "ops", False),
    ("recheckInterval", "1h", True),
    ("recheckInterval", "1h30m", True),
    ("recheckInterval", "90s", True),
    ("recheckInterval", "1m", True),
    ("recheckInterval", "999999h", True),
    ("recheckInterval", "1d", False),
    ("recheckInterval", "1.5h", False),
    ("recheckInterval", "1000000h", False),
]


@pytest.mark.parametrize(("path", "value", "valid"), REGEX_CASES)
def test_regex_rules_agree_with_parser(path: str, value: str, valid: bool) -> None:
    patterns = [rx for rule in cel_rules(at(path)) for rx in regexes(rule["rule"])]
    assert patterns, f"{path} has no regex rule"
    # Every regex of these fields is anchored; several in one field are alternatives joined with ||.
    crd_accepts = any(re.search(rx, value) for rx in patterns)
    assert crd_accepts is valid
    if valid:
        parse_spec(with_value(path, value))
    else:
        with pytest.raises(SpecError) as err:
            parse_spec(with_value(path, value))
        assert err.value.field == path


# ---------------------------------------------------------------------------------------------------------
# Shared samples


def _invalid_samples() -> list[dict[str, Any]]:
    with (SAMPLES / "invalid_specs.yaml").open() as f:
        items: list[dict[str, Any]] = yaml.safe_load(f)
    return items


INVALID = _invalid_samples()


def test_invalid_samples_are_well_formed() -> None:
    assert len(INVALID) >= 12
    names = [item["name"] for item in INVALID]
    assert len(set(names)) == len(names)
    for item in INVALID:
        assert set(item) == {"name", "field", "spec"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", item["name"]), item["name"]
        top = item["field"].split(".")[0]
        assert top in SPEC_SCHEMA["properties"], item


@pytest.mark.parametrize("item", INVALID, ids=[i["name"] for i in INVALID])
def test_parser_rejects_invalid_sample(item: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(item["spec"])
    field = item["field"]
    assert err.value.field == field or err.value.field.startswith(f"{field}."), (
        f"{item['name']}: parser blamed {err.value.field!r}, expected {field!r}"
    )


def _manifests(name: str) -> list[dict[str, Any]]:
    with (SAMPLES / name).open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.mark.parametrize("name", ["valid-minimal.yaml", "valid-full.yaml"])
def test_valid_samples_parse(name: str) -> None:
    docs = _manifests(name)
    configs = [d for d in docs if d["kind"] == KIND]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert configs
    for config in configs:
        assert config["apiVersion"] == f"{GROUP}/{VERSION}"
        spec = parse_spec(config["spec"])
        assert spec.secret_ref.key in secrets[spec.secret_ref.name]["stringData"]
        assert parse_spec(apply_defaults(config["spec"], SPEC_SCHEMA)) == spec


def test_valid_full_sets_every_field() -> None:
    (config,) = [d for d in _manifests("valid-full.yaml") if d["kind"] == KIND]

    def paths(value: Any, prefix: str = "") -> set[str]:
        if isinstance(value, dict):
            out: set[str] = set()
            for key, child in value.items():
                p = f"{prefix}.{key}" if prefix else key
                out |= {p} | paths(child, p)
            return out
        return set()

    schema_paths = {p for p, _ in walk(SPEC_SCHEMA) if "[]" not in p}
    # Either/or pairs: the sample shows one side of each.
    either_or = {
        "smtp.caBundle.secretKeyRef",
        "identity.caBundle.configMapKeyRef",
        "identity.clientSecret.expiresAtKey",
        # One credential kind per resource: valid-full shows clientSecret.
        "identity.clientCertificate",
        "identity.workloadIdentity",
    }
    unset = {p for p in schema_paths - paths(config["spec"]) if not any(p.startswith(e) for e in either_or)}
    assert not unset


# ---------------------------------------------------------------------------------------------------------
# Credential kinds


CERTIFICATE = {"clientCertificate": {"secretRef": {"name": "exo-app-cert"}}}
WORKLOAD = {"workloadIdentity": {"serviceAccountName": "mail-sender"}}


def _identity(**credential: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    del spec["identity"]["clientSecret"]
    spec["identity"].update(credential)
    return spec


def test_exactly_one_credential_rule_is_in_the_crd() -> None:
    rule = next(r for r in cel_rules(at("identity")) if "== 1" in r["rule"])
    for name in ("clientSecret", "clientCertificate", "workloadIdentity"):
        assert f"has(self.{name})" in rule["rule"]
    assert "== 1" in rule["rule"]


def test_certificate_and_workload_identity_parse() -> None:
    cert = parse_spec(_identity(**CERTIFICATE))
    assert cert.credential_kind == "ClientCertificate"
    assert cert.secret_ref is None
    assert cert.client_certificate is not None
    assert (
        cert.client_certificate.send_certificate_chain
        is at("identity.clientCertificate.sendCertificateChain")["default"]
    )
    assert cert.referenced_objects() == {("Secret", "exo-app-cert")}
    wi = parse_spec(_identity(**WORKLOAD))
    assert wi.credential_kind == "WorkloadIdentity"
    assert wi.referenced_objects() == set()
    assert wi.workload_identity is not None
    assert wi.workload_identity.subject("mail") == "system:serviceaccount:mail:mail-sender"
    own = parse_spec(_identity(workloadIdentity={"useOperatorIdentity": True}))
    assert own.workload_identity is not None
    assert own.workload_identity.use_operator_identity
    assert own.workload_identity.service_account is None


def test_audience_is_derived_per_cloud_and_documented() -> None:
    description = " ".join(at("identity.workloadIdentity.audience")["description"].split())
    assert "default" not in at("identity.workloadIdentity.audience")
    for name, cloud in CLOUDS.items():
        assert f"{name} {cloud.federation_audience}" in description
        spec = _identity(**WORKLOAD)
        spec["identity"]["cloud"] = name
        parsed = parse_spec(spec)
        assert parsed.workload_identity is not None
        assert parsed.workload_identity.audience == cloud.federation_audience


def test_secret_spec_references_secret_and_bundles() -> None:
    spec = with_value("identity.caBundle", {"configMapKeyRef": {"name": "trust", "key": "ca.pem"}})
    assert parse_spec(spec).referenced_objects() == {("Secret", "exo-app"), ("ConfigMap", "trust")}


@pytest.mark.parametrize("name", ["valid-certificate.yaml", "valid-workload-identity.yaml"])
def test_credential_samples_parse(name: str) -> None:
    (config,) = [d for d in _manifests(name) if d["kind"] == KIND]
    spec = parse_spec(config["spec"])
    assert spec.credential_kind in {"ClientCertificate", "WorkloadIdentity"}
    assert parse_spec(apply_defaults(config["spec"], SPEC_SCHEMA)) == spec


# spec.relay


RELAYED = with_value("relay", {"enabled": True, "credentialsSecretRef": {"name": "alerts-relay"}})


def test_relay_defaults_and_derived_senders() -> None:
    assert parse_spec(MINIMAL).relay is None
    assert parse_spec(with_value("relay", {"enabled": False})).relay is None
    relay = parse_spec(RELAYED).relay
    assert relay is not None
    assert relay.credentials_secret == "alerts-relay"
    assert relay.allowed_senders == (MINIMAL["username"],)
    assert relay.messages_per_minute == at("relay.messagesPerMinute")["default"] == 30
    assert relay.recipients_per_day == at("relay.recipientsPerDay")["default"] == 10_000
    assert at("relay.enabled")["default"] is False
    assert "default" not in at("relay.allowedSenders")
    assert "derived" in at("relay.allowedSenders")["description"]
    assert relay.allows(MINIMAL["username"].upper())
    assert not relay.allows("other@contoso.com")
    assert parse_spec(apply_defaults(RELAYED, SPEC_SCHEMA)) == parse_spec(RELAYED)


def test_relay_rules_agree() -> None:
    rules = cel_rules(at("relay"))
    assert [r["fieldPath"] for r in rules] == [".credentialsSecretRef"]
    with pytest.raises(SpecError) as err:
        parse_spec(with_value("relay", {"enabled": True}))
    assert err.value.field == "relay.credentialsSecretRef"
    senders = at("relay.allowedSenders")
    assert (senders["minItems"], senders["maxItems"]) == (1, 20)
    for bad in ([], [f"a{i}@contoso.com" for i in range(21)], ["alerts"]):
        with pytest.raises(SpecError) as err:
            parse_spec(with_value("relay.allowedSenders", bad, RELAYED))
        assert err.value.field == "relay.allowedSenders"
    (pattern,) = regexes(cel_rules(senders["items"])[0]["rule"])
    assert re.search(pattern, "alerts@contoso.com")
    assert not re.search(pattern, "alerts")
