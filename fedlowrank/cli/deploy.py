"""Flower's Deployment Engine on loopback: one SuperLink, one SuperNode per site, as at real sites.

``fedlowrank run adult-married --deployment 3 [--secure]`` calls :func:`deploy`:
it starts ``flower-superlink`` (Fleet, Control and Runtime on one port), N
``flower-supernode`` processes (each with its own node config: ``partition-id``,
``num-partitions``), runs the app with ``flwr run`` against that SuperLink, and stops every
process it started, by process group. With ``secure`` it first makes a CA and a server
certificate for 127.0.0.1 (TLS on every connection) and one EC key pair per SuperNode,
starts the SuperLink with ``--enable-supernode-auth`` and registers each node's public key
(``flwr supernode register``); a SuperNode whose key is not registered is refused.
The same topology runs in containers with ``docker/`` (see its README).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

PORT = 39191  # the SuperLink's one port (Fleet, Control, Runtime); away from the simulation's
NODE_PORT = 39291  # SuperNode i serves its ClientApp runtime API on NODE_PORT + i
FEDERATION = "loopback"


def which(name: str) -> str:
    return shutil.which(name) or name


def make_certificates(folder: Path, hostnames: tuple[str, ...] = ("localhost",), days: int = 2,
                      ca_key_file: Path | None = None) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 and ``hostnames``, signed by it (PEM).

    With ``ca_key_file``: the CA's private key is kept there (owner-only), and where it and
    ``folder/ca.crt`` exist already, only the server certificate is issued again, by the same
    CA (a new server hostname, an expired certificate), so sites keep the ``ca.crt`` they have.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_key_file is not None and ca_key_file.exists() and (folder / "ca.crt").exists():
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        ca_name = ca_cert.subject
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlowrank loopback CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        if ca_key_file is not None:
            ca_key_file.parent.mkdir(parents=True, exist_ok=True)
            ca_key_file.write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
            os.chmod(ca_key_file, 0o600)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(h) for h in hostnames), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair in OpenSSH format, as SuperNode authentication expects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def healthy(certs: dict[str, Path] | None) -> bool:
    scheme = "https" if certs else "http"
    context = ssl.create_default_context(cafile=str(certs["ca"])) if certs else None
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{PORT}/health", timeout=1, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own group (so that stopping it stops what it spawned), output to ``log``."""
    handle = open(log, "w")
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process group, then SIGKILL what is left after 20 s."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def write_federation(flwr_home: Path, certs: dict[str, Path] | None) -> None:
    """``flwr``'s config: the ``loopback`` SuperLink (TLS with our CA, or insecure)."""
    tls = f'root-certificates = "{certs["ca"]}"' if certs else "insecure = true"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "127.0.0.1:{PORT}"\n{tls}\n'
    )


def deploy(app: Path, nodes: int, secure: bool, run_config: str, env: dict, stream, unregistered: int = 0) -> int:
    """Run ``app`` on a loopback deployment of ``nodes`` SuperNodes; returns the exit code.

    ``unregistered`` extra SuperNodes (``secure`` only) start with keys the SuperLink does
    not know: they must be refused while the run goes on with the others.
    """
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"something already serves 127.0.0.1:{PORT}; stop it first")
    home = Path(env["FLWR_HOME"])
    work = home / "deployment"
    work.mkdir(parents=True, exist_ok=True)
    certs = make_certificates(work / "certs") if secure else None
    write_federation(home, certs)
    processes: list[subprocess.Popen] = []
    try:
        tls = ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
               "--enable-supernode-auth"] if secure else ["--insecure"]
        processes.append(start([which("flower-superlink"), *tls, "--host", "127.0.0.1", "--port", str(PORT),
                                "--isolation", "subprocess"], env, work / "superlink.log"))
        deadline = time.monotonic() + 120
        while not healthy(certs):
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start; see {work / 'superlink.log'}")
            time.sleep(0.5)
        print(f"SuperLink up on 127.0.0.1:{PORT} ({'TLS + SuperNode auth' if secure else 'insecure'})", flush=True)
        for i in range(nodes + (unregistered if secure else 0)):
            auth: list[str] = []
            if secure:
                private, public = make_node_key(work / "keys", f"site-{i}")
                if i < nodes:
                    done = subprocess.run([which("flwr"), "supernode", "register", str(public), FEDERATION],
                                          env=env, capture_output=True, text=True, timeout=60)
                    if done.returncode != 0:
                        raise RuntimeError(f"registering site-{i}'s key failed: {done.stdout[-500:]}{done.stderr[-500:]}")
                auth = ["--root-certificates", str(certs["ca"]), "--auth-supernode-private-key", str(private)]
            else:
                auth = ["--insecure"]
            node_config = f"partition-id={i % nodes} num-partitions={nodes}"
            processes.append(start([which("flower-supernode"), *auth, "--superlink", f"127.0.0.1:{PORT}",
                                    "--node-config", node_config, "--port", str(NODE_PORT + i), "--isolation", "subprocess",
                                    "--max-retries", "3"], env, work / f"supernode-{i}.log"))
            label = "registered" if not secure or i < nodes else "NOT registered (must be refused)"
            print(f"SuperNode site-{i}: {node_config} ({label})", flush=True)
        command = [which("flwr"), "run", str(app), FEDERATION, "--stream"]
        if run_config:
            command += ["--run-config", run_config]
        stream.superlink = FEDERATION
        return stream.outcome(*stream(command, env), env)
    finally:
        stop_all(processes)
        print(f"stopped the SuperLink and {len(processes) - 1} SuperNodes", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``fedlowrank certs DIR --sites N``: certificates and node keys for ``docker/``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fedlowrank certs",
        description="Make TLS certificates (a CA, the SuperLink's certificate) and one SuperNode key pair per site "
                    "for a deployment (docker/README.md). Writes FOLDER/certificates, FOLDER/keys and the CA's "
                    "private key FOLDER/ca/ca.key; run again, it keeps the CA and existing site keys and issues "
                    "the SuperLink's certificate again (e.g. for a new --hostname).",
    )
    parser.add_argument("folder", type=Path, help="where to write certificates/ and keys/ (e.g. docker)")
    parser.add_argument("--sites", type=int, default=3, help="SuperNode key pairs to make, site-1 .. site-N (default 3)")
    parser.add_argument("--hostname", action="append", default=["superlink", "localhost"],
                        help="a name the SuperLink is reached by, in its certificate (repeatable; default superlink, localhost)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    args = parser.parse_args(argv)
    ca_key = args.folder / "ca" / "ca.key"
    if ca_key.exists():
        print(f"{ca_key} exists: issuing the SuperLink's certificate again from the same CA (sites keep their ca.crt)")
    paths = make_certificates(args.folder / "certificates", tuple(args.hostname), args.days, ca_key_file=ca_key)
    keys = []
    for i in range(1, args.sites + 1):
        if (args.folder / "keys" / f"site-{i}.key").exists():  # a site's key is its identity: never replaced
            print(f"kept {args.folder / 'keys' / f'site-{i}.key'}")
            continue
        keys.append(make_node_key(args.folder / "keys", f"site-{i}"))
    for path in [*paths.values(), *(k for pair in keys for k in pair)]:
        print(path)
    print(f"The CA's private key is {ca_key}: keep it off the servers (it is mounted in no container); "
          "rerun this command with another --hostname to issue the SuperLink's certificate again.")
    print("Flower's containers run as uid 49999: sudo chown -R 49999:49999 on these folders before docker compose up")

