"""TLS and mutual TLS for gRPC from PEM files: a test CA issues the server's
and a client's certificates; a second, untrusted CA issues look-alikes. A
client that does not trust the server, or (with a client CA set) cannot show
a certificate from that CA, is refused during the handshake."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pathlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import ServerProcess

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

HELLO = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=3)


@dataclasses.dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclasses.dataclass
class Pki:
    folder: pathlib.Path
    ca: Issued
    server: Issued
    client: Issued
    rogue_ca: Issued
    rogue_client: Issued

    def write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca, rogue_ca = make_ca("qwen-test-ca"), make_ca("qwen-test-ca")  # same name, different key
    return Pki(
        folder=tmp_path_factory.mktemp("pki"),
        ca=ca,
        server=issue(ca, "qwen-server", server=True),
        client=issue(ca, "client-a", server=False),
        rogue_ca=rogue_ca,
        rogue_client=issue(rogue_ca, "client-a", server=False),
    )


def _server_args(pki: Pki, mutual: bool) -> list[str]:
    args = [
        "--tls-cert-file",
        pki.write("server.pem", pki.server.cert_pem()),
        "--tls-key-file",
        pki.write("server.key", pki.server.key_pem()),
    ]
    if mutual:
        args += ["--tls-client-ca-file", pki.write("client-ca.pem", pki.ca.cert_pem())]
    return args


def _chat(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            reply = pb_grpc.QwenServiceStub(channel).Chat(HELLO, timeout=15)
        except grpc.RpcError as exc:
            return exc.code()
        assert reply.is_final
        return grpc.StatusCode.OK


def test_tls_serves_clients_that_trust_the_ca_only(tiny_model_dir, pki):
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem())
    server = ServerProcess(tiny_model_dir, *_server_args(pki, mutual=False), credentials=trusted)
    try:
        server.wait_serving()
        assert _chat(server.target, trusted) == grpc.StatusCode.OK
        # Plaintext to a TLS port, and TLS with a CA that did not sign the server's certificate.
        assert _chat(server.target, None) == grpc.StatusCode.UNAVAILABLE
        untrusting = grpc.ssl_channel_credentials(root_certificates=pki.rogue_ca.cert_pem())
        assert _chat(server.target, untrusting) == grpc.StatusCode.UNAVAILABLE
        assert "Traceback" not in server.log
    finally:
        server.close()


def test_mutual_tls_refuses_clients_without_a_valid_certificate(tiny_model_dir, pki):
    def credentials(client: Issued | None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem())
        return grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert_pem(), private_key=client.key_pem(), certificate_chain=client.cert_pem()
        )

    valid = credentials(pki.client)
    server = ServerProcess(tiny_model_dir, *_server_args(pki, mutual=True), credentials=valid)
    try:
        server.wait_serving()
        assert _chat(server.target, valid) == grpc.StatusCode.OK
        assert _chat(server.target, credentials(None)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        assert _chat(server.target, credentials(pki.rogue_client)) == grpc.StatusCode.UNAVAILABLE  # wrong CA
        assert _chat(server.target, None) == grpc.StatusCode.UNAVAILABLE
        assert server.process.poll() is None
    finally:
        server.close()


def test_python_sdk_with_mutual_tls_and_an_api_key(tiny_model_dir, pki, tmp_path):
    """The client SDK's TLS and API-key options against a server that
    requires both: what a user of the SDK actually runs."""
    from qwen_grpc_client import QwenClient

    key = "sdk-key-0123456789abcdef"
    client_cert = pki.write("client.pem", pki.client.cert_pem())
    client_key = pki.write("client.key", pki.client.key_pem())
    ca = pki.write("ca.pem", pki.ca.cert_pem())
    valid = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem(), private_key=pki.client.key_pem(), certificate_chain=pki.client.cert_pem()
    )
    server = ServerProcess(
        tiny_model_dir, *_server_args(pki, mutual=True), env={"QWEN_API_KEYS": key}, credentials=valid
    )
    try:
        server.wait_serving()
        tls = {"root_certificates": ca, "client_certificate_chain": client_cert, "client_private_key": client_key}
        client = QwenClient(server.target, api_key=key, timeout=30, **tls)
        assert client.chat([{"role": "user", "content": "hi"}], max_tokens=3).finish_reason in ("stop", "length")
        client.channel.close()
        keyless = QwenClient(server.target, timeout=30, **tls)
        with pytest.raises(grpc.RpcError) as info:
            keyless.chat([{"role": "user", "content": "hi"}], max_tokens=3)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        keyless.channel.close()
    finally:
        server.close()
