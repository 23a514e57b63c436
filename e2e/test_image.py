"""The container image, run as a container: built by ``hack/image.sh``, unpacked with umoci, run with runc.

The image is built (or taken from the cache: the layers are keyed by a hash of their inputs) and unpacked;
the chart is installed into a real control plane, and its Deployment's Pod template is what the OCI
runtime config is made from: the command and arguments, the user and group (65532), a read-only root
file system, no capabilities, no new privileges, the memory limit, the ``/tmp`` emptyDir as a tmpfs. The
ServiceAccount's token (a TokenRequest, as the kubelet would project it), the API server's CA and the
namespace are mounted at ``/var/run/secrets/kubernetes.io/serviceaccount/`` and
``KUBERNETES_SERVICE_HOST``/``PORT`` point at the API server, so the operator takes the in-cluster
configuration path. The container shares the host's network namespace (the API server and the local
Entra ID and Exchange listen on loopback); the one departure from the chart: its health and metrics
servers listen on 127.0.0.1 instead of 0.0.0.0, because servers of tests stay on loopback.

Skipped, with the reason, where runc or umoci is missing or the test does not run as root (runc's
rootful mode); ``make bootstrap`` installs both on Debian (hack/image-debs.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.controlplane import REPO_ROOT, ControlPlane, free_port

from smtp_oauth_operator.testing.devservers import DevServers

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "smtp-oauth-operator"
IMAGE_SCRIPT = REPO_ROOT / "hack" / "image.sh"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RELEASE, NAMESPACE, WATCHED = "img", "smtp-oauth-operator", "mail"
CLIENT_SECRET = "image-e2e~CANARY.client-secret_0123456789"
# Kubernetes' default when the Pod spec sets none (the chart does not).
DEFAULT_GRACE_SECONDS = 30
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


def _why_not() -> str | None:
    missing = [tool for tool in ("runc", "umoci") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (make bootstrap installs them with hack/image-debs.sh)"
    if os.geteuid() != 0:
        return "runc runs containers as root here (rootful runc); run the e2e suite as root"
    return None


# --------------------------------------------------------------------------------------------
# the image


@dataclass
class Image:
    archive: Path
    layout: Path
    tag: str
    config: dict[str, Any]
    manifest: dict[str, Any]
    index: dict[str, Any]
    build_seconds: float


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text()
    )
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    reason = _why_not()
    if reason:
        pytest.skip(f"the image is not run as a container: {reason}")
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "--no-sbom"],
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
        check=False,  # its progress goes to our stderr
    )
    assert proc.returncode == 0, f"hack/image.sh failed ({proc.returncode}):\n{proc.stdout}"
    archive = Path(proc.stdout.strip().splitlines()[-1])
    layout = tmp_path_factory.mktemp("image") / "layout"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # PEP 706; not in every 3.11 build
            tar.extractall(layout, filter="data")
        else:  # pragma: no cover - our own archive, written by hack/image-oci.py
            tar.extractall(layout)
    index = json.loads((layout / "index.json").read_text())
    (descriptor,) = index["manifests"]
    manifest = _blob(layout, descriptor["digest"])
    config = _blob(layout, manifest["config"]["digest"])
    tag = descriptor["annotations"]["org.opencontainers.image.ref.name"]
    return Image(archive, layout, tag, config, manifest, index, time.monotonic() - started)


@pytest.fixture(scope="module")
def bundle(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{image.layout}:{image.tag}", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return path


def test_the_image_is_labelled_minimal_and_unprivileged(image: Image, bundle: Path) -> None:
    print(f"image built or taken from the cache in {image.build_seconds:.1f}s")
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        import tomllib  # noqa: PLC0415 - only this test reads the version

        version = tomllib.load(fh)["project"]["version"]
    assert image.tag == version
    config = image.config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["smtp-oauth-operator"]
    assert config["Cmd"][0] == "run"
    labels = config["Labels"]
    for key in ("source", "version", "revision", "licenses", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key} missing"
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert image.index["manifests"][0]["annotations"]["io.containerd.image.name"].endswith(f":{version}")

    rootfs = bundle / "rootfs"
    # No shell, no package manager: nothing to exec into, nothing to install with.
    for absent in ("bin/sh", "bin/bash", "usr/bin/dash", "usr/bin/dpkg", "usr/bin/apt", "usr/bin/perl"):
        assert not (rootfs / absent).exists(), f"/{absent} is in the image"
    assert (rootfs / "opt/venv/bin/smtp-oauth-operator").is_file()
    assert (rootfs / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
    # Byte code for everything (a read-only root cannot take it at run time), none of it timestamp-based.
    pycs = list((rootfs / "opt/venv/lib").rglob("*.pyc"))
    assert len(pycs) > 1000
    for pyc in pycs[:200]:
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{pyc} is not an unchecked-hash pyc (flags {flags:#b})"
    # Nothing in the image belongs to the user the operator runs as, and nothing is world-writable but
    # the sticky temporary directories (read-only anyway; the chart mounts an emptyDir on /tmp).
    sticky = {rootfs / d for d in ("tmp", "var/tmp", "var/lock", "run/lock")}
    for path in rootfs.rglob("*"):
        st = path.lstat()
        assert st.st_uid == 0, f"{path} belongs to uid {st.st_uid}"
        if not path.is_symlink() and st.st_mode & 0o002:
            assert path in sticky, f"{path} is world-writable"


# --------------------------------------------------------------------------------------------
# the control plane, the chart, the dev servers


@dataclass
class Cluster:
    cp: ControlPlane
    pod: dict[str, Any]
    tmp: Path
    audit_log: Path

    def audit(self, user: str) -> list[dict[str, Any]]:
        events = [json.loads(line) for line in self.audit_log.read_text().splitlines()]
        return [e for e in events if e.get("user", {}).get("username") == user]


@pytest.fixture(scope="module")
def cluster(image: Image, k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("image-cluster")
    policy, audit_log = tmp / "audit-policy.yaml", tmp / "audit.log"
    policy.write_text(AUDIT_POLICY)
    cp = ControlPlane(
        k8s_bin_dir,
        extra_apiserver_flags=[
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-mode=blocking",
        ],
    )
    cp.start()
    try:
        cp.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace")
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/smtpoauthconfigs.smtpoauth.dev", "--timeout=60s"
        )
        cp.kubectl("create", "namespace", WATCHED)
        deployment = json.loads(
            cp.kubectl(
                "get", "deployment", f"{RELEASE}-smtp-oauth-operator", "-n", NAMESPACE, "-o", "json"
            ).stdout
        )
        yield Cluster(cp, deployment["spec"]["template"]["spec"], tmp, audit_log)
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def dev_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServers]:
    with DevServers(tmp_path_factory.mktemp("image-dev"), client_secret=CLIENT_SECRET) as servers:
        yield servers


# --------------------------------------------------------------------------------------------
# the container


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def oci_config(
    base: dict[str, Any],
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    rootfs: Path,
    env: Sequence[str] = (),
    host_dirs: dict[str, Path] | None = None,
    sa_dir: Path | None = None,
) -> dict[str, Any]:
    """umoci's runtime config for the image, with a container of the Pod template applied.

    ``host_dirs`` maps the names of volumes that are not emptyDirs (ConfigMaps), or of emptyDirs the test
    reads afterwards, to host directories that are bind-mounted in their place.
    """
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    config: dict[str, Any] = json.loads(json.dumps(base))
    config["root"] = {"path": str(rootfs), "readonly": bool(sc["readOnlyRootFilesystem"])}
    process = config["process"]
    process["args"] = [*container.get("command", []), *container.get("args", [])] or process["args"]
    process_env = [e for e in process.get("env", []) if not e.startswith(("HOSTNAME=", "TERM="))]
    for var in container.get("env", []):
        if "value" in var:
            process_env.append(f"{var['name']}={var['value']}")
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            process_env.append(f"{var['name']}=img-operator-0")
    process["env"] = [*process_env, "HOME=/nonexistent", *env]  # HOME: what containerd sets from /etc/passwd
    process["terminal"] = False
    process["user"] = {
        "uid": sc.get("runAsUser", pod_sc["runAsUser"]),
        "gid": sc.get("runAsGroup", pod_sc["runAsGroup"]),
        "additionalGids": [pod_sc["fsGroup"]] if "fsGroup" in pod_sc else [],
    }
    assert sc["capabilities"]["drop"] == ["ALL"]
    process["capabilities"] = {
        k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    process["noNewPrivileges"] = sc["allowPrivilegeEscalation"] is False
    # runc cannot set rlimits on this kernel from a container's config; the Pod has none either.
    process.pop("rlimits", None)
    config["hostname"] = "img-operator-0"

    linux = config["linux"]
    # hostNetwork in effect: the API server and the dev servers are on the host's loopback.
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] not in ("network", "user")]
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit:
        linux.setdefault("resources", {})["memory"] = {"limit": _memory_bytes(limit)}

    mounts = [m for m in config["mounts"] if m["destination"] not in ("/sys", "/tmp")]
    mounts.append({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid", "noexec", "nodev"]})  # fmt: skip
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        name, volume = mount["name"], volumes[mount["name"]]
        if host_dirs and name in host_dirs:
            options = ["rbind", "ro" if mount.get("readOnly") else "rw"]
            mounts.append({"destination": mount["mountPath"], "type": "bind", "source": str(host_dirs[name]), "options": options})  # fmt: skip
            continue
        assert "emptyDir" in volume, (
            f"volume {name} is not an emptyDir: give the test a host directory for it"
        )
        size = _memory_bytes(volume["emptyDir"].get("sizeLimit", "16Mi"))
        mounts.append({"destination": mount["mountPath"], "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", f"size={size}"]})  # fmt: skip
    if sa_dir is not None:
        mounts.append(
            {"destination": SA_DIR, "type": "bind", "source": str(sa_dir), "options": ["rbind", "ro"]}
        )
    for path in ("/etc/hosts", "/etc/resolv.conf"):  # the kubelet's too
        if Path(path).exists():
            mounts.append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]})
    config["mounts"] = mounts
    return config


def write_bundle(path: Path, config: dict[str, Any]) -> Path:
    """A bundle directory holding only config.json; its root is the unpacked image's (shared) rootfs."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


class Container:
    """One runc container of the image: started in the foreground, so its exit code is runc's."""

    def __init__(self, bundle: Path, state: Path, name: str, log: Path) -> None:
        self.bundle, self.state, self.name, self.log_path = bundle, state, name, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["runc", "--root", str(self.state), "run", "--bundle", str(self.bundle), self.name],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, signal_name: str) -> None:
        subprocess.run(
            ["runc", "--root", str(self.state), "kill", self.name, signal_name], check=True, timeout=30
        )

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def remove(self) -> None:
        if self.alive():
            with contextlib.suppress(subprocess.SubprocessError):
                self.kill("KILL")
                self.wait(30)
        subprocess.run(
            ["runc", "--root", str(self.state), "delete", "--force", self.name],
            capture_output=True,
            check=False,
            timeout=30,
        )


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status), response.read().decode(errors="replace")


def _sample(dev: DevServers) -> dict[str, Any]:
    e = dev.endpoints
    ca_ref = {"configMapKeyRef": {"name": "dev-ca", "key": "ca.pem"}}
    items = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dev-ca"}, "data": {"ca.pem": Path(e.ca_file).read_text()}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "exo-app"}, "stringData": {"client-secret": CLIENT_SECRET}},
        {
            "apiVersion": "smtpoauth.dev/v1alpha1",
            "kind": "SmtpOAuthConfig",
            "metadata": {"name": "mail"},
            "spec": {
                "username": e.mailbox,
                "smtp": {"host": e.smtp_host, "port": e.smtp_port, "connectionTimeoutSeconds": 10, "caBundle": ca_ref},
                "identity": {
                    "tenantId": e.tenant_id,
                    "clientId": e.client_id,
                    "authorityHost": e.authority_host,
                    "timeoutSeconds": 10,
                    "caBundle": ca_ref,
                    "clientSecret": {"secretKeyRef": {"name": "exo-app", "key": "client-secret"}},
                },
            },
        },
    ]  # fmt: skip
    return {"apiVersion": "v1", "kind": "List", "items": items}


def test_the_image_runs_the_operator_under_the_charts_security_context(
    image: Image, bundle: Path, cluster: Cluster, dev_servers: DevServers
) -> None:
    cp, pod = cluster.cp, cluster.pod
    assert cp.ca_file is not None
    assert cp.apiserver_port is not None
    service_account = pod["serviceAccountName"]

    sa_dir = cluster.tmp / "serviceaccount"
    sa_dir.mkdir()
    token = cp.token_for(NAMESPACE, service_account, duration=3600)
    (sa_dir / "token").write_text(token)
    shutil.copyfile(cp.ca_file, sa_dir / "ca.crt")
    (sa_dir / "namespace").write_text(NAMESPACE)
    for f in sa_dir.iterdir():
        f.chmod(0o644)  # the kubelet's projected volume is readable by the Pod's fsGroup; 0644 is simpler
    sa_dir.chmod(0o755)

    health_port, metrics_port = free_port(), free_port()
    (spec,) = pod["containers"]
    config = oci_config(
        json.loads((bundle / "config.json").read_text()),
        pod,
        spec,
        rootfs=bundle / "rootfs",
        sa_dir=sa_dir,
        env=[
            "KUBERNETES_SERVICE_HOST=127.0.0.1",
            f"KUBERNETES_SERVICE_PORT={cp.apiserver_port}",
            "SMTPOAUTH_METRICS_ADDRESS=127.0.0.1",  # loopback only, see the module docstring
        ],
    )
    args = config["process"]["args"]
    assert args[:2] == ["smtp-oauth-operator", "run"], args
    assert "--all-namespaces" in args, args
    config["process"]["args"] = [
        f"--liveness=http://127.0.0.1:{health_port}/healthz"
        if a.startswith("--liveness=")
        else f"--metrics-port={metrics_port}"
        if a.startswith("--metrics-port=")
        else a
        for a in args
    ]
    grace = int(pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))

    container = Container(
        write_bundle(cluster.tmp / "operator-bundle", config),
        cluster.tmp / "runc",
        "smtp-oauth-operator-e2e",
        cluster.tmp / "container.log",
    )
    container.start()
    try:
        # /healthz and /metrics answer.
        deadline = time.monotonic() + 90
        while True:
            assert container.alive(), (
                f"the container exited ({container.proc and container.proc.returncode}):\n{container.log[-6000:]}"
            )
            with contextlib.suppress(OSError):
                if _get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline, f"no /healthz within 90s:\n{container.log[-6000:]}"
            time.sleep(0.5)
        status, metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert "smtpoauth_" in metrics, metrics[:2000]

        # A SmtpOAuthConfig becomes Ready: the token from the local Entra ID (HTTPS, the dev CA from the
        # resource's caBundle ConfigMap), then STARTTLS + XOAUTH2 at the local Exchange.
        cp.kubectl("apply", "-n", WATCHED, "-f", "-", input=json.dumps(_sample(dev_servers)))
        wait = cp.kubectl(
            "wait",
            "--for=condition=Ready",
            "smtpoauthconfig/mail",
            "-n",
            WATCHED,
            "--timeout=120s",
            check=False,
        )
        if wait.returncode != 0:
            obj = cp.kubectl(
                "get", "smtpoauthconfig", "mail", "-n", WATCHED, "-o", "json", check=False
            ).stdout
            pytest.fail(f"not Ready: {wait.stderr}\n{obj}\n{container.log[-6000:]}")
        assert dev_servers.exchange.auth_attempts, "the local Exchange saw no AUTH"
        _, metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert f'smtpoauth_ready{{name="mail",namespace="{WATCHED}"}} 1.0' in metrics, metrics[:3000]

        # SIGTERM (what the kubelet sends) stops it cleanly, well within the grace period.
        stopping = time.monotonic()
        container.kill("TERM")
        try:
            code = container.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running {grace}s after SIGTERM (terminationGracePeriodSeconds):\n{container.log[-4000:]}"
            )
        took = time.monotonic() - stopping
        print(f"stopped {took:.1f}s after SIGTERM (grace period {grace}s)")
        assert code == 0, f"exit code {code} after SIGTERM:\n{container.log[-4000:]}"
    finally:
        container.remove()
        print(f"container log: {container.log_path}")

    log = container.log
    # The in-cluster path: no kubeconfig anywhere, so every request came with the mounted token, as the
    # chart's ServiceAccount, and its RBAC was enough (no 403).
    assert not [e for e in config["process"]["env"] if e.startswith("KUBECONFIG=")]
    calls = cluster.audit(f"system:serviceaccount:{NAMESPACE}:{service_account}")
    assert calls, "no request as the ServiceAccount"
    codes = {
        (c["verb"], c.get("objectRef", {}).get("resource", ""), c["responseStatus"]["code"]) for c in calls
    }
    assert ("patch", "smtpoauthconfigs", 200) in codes, codes
    assert not [c for c in codes if c[2] == 403], codes
    for bad in (
        "Traceback",
        "Read-only file system",
        "Permission denied",
        "Unexpected error while reconciling",
    ):
        assert bad not in log, f"{bad!r} in the container's log:\n{log[-6000:]}"
    assert CLIENT_SECRET not in log
    assert token not in log


def test_the_charts_extra_ca_bundle_init_container_runs_in_the_image(
    image: Image, bundle: Path, k8s_bin_dir: Path, tmp_path: Path
) -> None:
    """extraCaBundle's init container (the image's CA bundle plus the extra CA, into an emptyDir) works in
    the image as it is: no shell there, a read-only root, user 65532."""
    rendered = subprocess.run(
        [str(k8s_bin_dir / "helm"), "template", RELEASE, str(CHART), "-n", NAMESPACE,
         "--set", "extraCaBundle.enabled=true", "--set", "extraCaBundle.configMapName=corp-ca",
         "--show-only", "templates/deployment.yaml"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    pod = json.loads(json.dumps(yaml.safe_load(rendered.stdout)))["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    extra_ca, out = tmp_path / "extra-ca", tmp_path / "ca-bundle"
    extra_ca.mkdir()
    out.mkdir()
    out.chmod(0o777)  # an emptyDir is writable by the Pod's user
    corp_ca = "-----BEGIN CERTIFICATE-----\nMIIBcorpca\n-----END CERTIFICATE-----\n"
    (extra_ca / "ca.crt").write_text(corp_ca)
    config = oci_config(
        json.loads((bundle / "config.json").read_text()),
        pod,
        init,
        rootfs=bundle / "rootfs",
        host_dirs={"extra-ca": extra_ca, "ca-bundle": out},
    )
    container = Container(
        write_bundle(tmp_path / "init-bundle", config), tmp_path / "runc", "img-init", tmp_path / "init.log"
    )
    container.start()
    try:
        code = container.wait(timeout=60)
    finally:
        container.remove()
    assert code == 0, f"the init container exited with {code}:\n{container.log}"
    bundle_text = (out / "ca-bundle.crt").read_text()
    system = (bundle / "rootfs" / "etc/ssl/certs/ca-certificates.crt").read_text()
    assert bundle_text.startswith(system.rstrip("\n")), "the image's CA bundle is not at the start"
    assert bundle_text.endswith(corp_ca), "the extra CA is not appended"


def test_the_image_trusts_the_public_cas_out_of_the_box(image: Image, bundle: Path, tmp_path: Path) -> None:
    """Without a caBundle the operator verifies Entra ID and Exchange Online against the system store:
    OpenSSL's default paths in the image must lead to Debian's CA bundle (made without update-ca-certificates)."""
    pod = {
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
        "containers": [],
    }
    container_spec = {
        "command": [
            "python3",
            "-c",
            "import ssl; ctx = ssl.create_default_context(); print(len(ctx.get_ca_certs()))",
        ],
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    config = oci_config(
        json.loads((bundle / "config.json").read_text()), pod, container_spec, rootfs=bundle / "rootfs"
    )
    container = Container(
        write_bundle(tmp_path / "ssl-bundle", config), tmp_path / "runc", "img-ssl", tmp_path / "ssl.log"
    )
    container.start()
    try:
        code = container.wait(timeout=60)
    finally:
        container.remove()
    assert code == 0, container.log
    assert int(container.log.strip().splitlines()[-1]) > 100, container.log
