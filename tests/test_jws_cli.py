"""``ocpp-router sign --jws`` and ``policy explain`` for OCPP 2.1 Signed Messages, as an
operator runs them; the JWS is checked by hand with ``cryptography`` too."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from policies.jws import VerifiedJws, load_certificate, verify_jws
from tests.test_policies_jws import Signer

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_sign_jws_makes_what_the_firewall_and_cryptography_accept(tmp_path: Path) -> None:
    signer = Signer(starts=datetime.now(UTC) - timedelta(days=1))
    (tmp_path / "ops.crt").write_bytes(signer.pem)
    (tmp_path / "ops.key").write_bytes(signer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    done = cli("sign", "--jws", "--cert", str(tmp_path / "ops.crt"), "--key",
               str(tmp_path / "ops.key"), "--action", "Reset", stdin='{"type":"Immediate"}')
    assert done.returncode == 0, done.stderr
    signed = json.loads(done.stdout)
    assert set(signed) == {"protected", "payload", "signature"}
    header = json.loads(b64d(signed["protected"]))
    assert header == {"alg": "ES256", "OCPPAction": "Reset", "OCPPMessageTypedId": 2,
                      "x5t#S256": signer.x5t}
    # by hand: the ES256 signature over protected.payload, with the certificate's key
    raw = b64d(signed["signature"])
    public = x509.load_pem_x509_certificate(signer.pem).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:])),
                  f"{signed['protected']}.{signed['payload']}".encode(),
                  ec.ECDSA(hashes.SHA256()))
    cert = load_certificate(signer.pem)
    result = verify_jws(signed, "Reset-Signed", 2, {cert.x5t: cert}, time.time())
    assert isinstance(result, VerifiedJws) and result.payload == {"type": "Immediate"}

    # policy explain names the rule and the certificate that satisfied it
    (tmp_path / "policy.toml").write_text(
        'default = "reject"\n[[keys]]\nid = "ops"\ncertificate = "ops.crt"\nroles = ["admin"]\n'
        '[[rules]]\nname = "resets need an admin"\nactions = ["Reset"]\n'
        'require = { roles = ["admin"] }\nthen = "forward"\n')
    (tmp_path / "signed.json").write_text(done.stdout)
    explained = cli("policy", "explain", str(tmp_path / "policy.toml"), "--action",
                    "Reset-Signed", "--direction", "to-station", "--source", "csms",
                    "--payload", str(tmp_path / "signed.json"))
    assert explained.returncode == 0, explained.stderr
    assert "resets need an admin" in explained.stdout and "ops" in explained.stdout

    # a key that is not the certificate's is refused with a clear message
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    wrong = cli("sign", "--jws", "--cert", str(tmp_path / "ops.crt"), "--key", str(other),
                "--action", "Reset", stdin="{}")
    assert wrong.returncode == 2 and "does not belong" in wrong.stderr


def test_keys_certificate_makes_a_signer_the_policy_and_the_cli_accept(tmp_path: Path) -> None:
    """keys new + keys certificate: what examples/policies/make-14a-certs.sh runs."""
    key, crt = tmp_path / "dso.key.pem", tmp_path / "dso.crt.pem"
    assert cli("keys", "new", "--out", str(key)).returncode == 0
    made = cli("keys", "certificate", "--key", str(key), "--cn", "DSO Netz", "--days", "30",
               "--out", str(crt))
    assert made.returncode == 0, made.stderr
    cert = load_certificate(crt.read_bytes())
    assert made.stdout.strip() == cert.x5t and cert.subject == "CN=DSO Netz"
    assert cert.not_before <= time.time() <= cert.not_after <= time.time() + 30 * 86400
    done = cli("sign", "--jws", "--cert", str(crt), "--key", str(key), "--action",
               "SetChargingProfile", stdin='{"evseId":0}')
    assert done.returncode == 0, done.stderr
    result = verify_jws(json.loads(done.stdout), "SetChargingProfile-Signed", 2,
                        {cert.x5t: cert}, time.time())
    assert isinstance(result, VerifiedJws) and result.payload == {"evseId": 0}
    # refusals: an existing file, a key chapter 7 has no algorithm for, no such key
    again = cli("keys", "certificate", "--key", str(key), "--cn", "x", "--out", str(crt))
    assert again.returncode == 2 and "already exists" in again.stderr
    ed = tmp_path / "ed.key.pem"
    cli("keys", "new", "--algorithm", "ed25519", "--out", str(ed))
    refused = cli("keys", "certificate", "--key", str(ed), "--cn", "x",
                  "--out", str(tmp_path / "ed.crt"))
    assert refused.returncode == 2 and "P-256" in refused.stderr
    missing = cli("keys", "certificate", "--key", str(tmp_path / "nope"), "--cn", "x",
                  "--out", str(tmp_path / "n.crt"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr

