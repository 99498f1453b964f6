#!/usr/bin/python3
"""Print the CA certificates this host trusts beyond Debian's own (PEM), for the image build.

Behind a TLS-intercepting proxy the host's /etc/ssl/certs/ca-certificates.crt holds the
proxy's CA; a build container does not, so pip and npm in it cannot reach PyPI or npm.
`make image` and tests/deploy pass what this prints as the build argument EXTRA_CA_CERTS,
which only the Dockerfile's build stage uses (the final image never holds it). Prints
nothing when the host trusts only Debian's CAs (ca-certificates' /usr/share/ca-certificates).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_CAS = Path("/usr/share/ca-certificates")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s+(.*?)\s+-----END CERTIFICATE-----", re.S)


def _bodies(text: str) -> list[str]:
    return ["".join(body.split()) for body in _PEM.findall(text)]


def extra_certificates(bundle: Path = BUNDLE, debian_cas: Path = DEBIAN_CAS) -> list[str]:
    """The certificates of ``bundle`` that are not among ``debian_cas``, as PEM blocks."""
    try:
        trusted = _bodies(bundle.read_text(errors="replace"))
    except OSError:
        return []
    known = {body for path in debian_cas.rglob("*.crt") for body in _bodies(path.read_text(errors="replace"))}
    extra = dict.fromkeys(body for body in trusted if body not in known)
    return [
        "-----BEGIN CERTIFICATE-----\n"
        + "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
        + "\n-----END CERTIFICATE-----"
        for body in extra
    ]


if __name__ == "__main__":
    certificates = extra_certificates()
    if certificates:
        sys.stdout.write("\n".join(certificates) + "\n")
