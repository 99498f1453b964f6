"""One Settings object, read once at start-up from the environment (or ``.env``).

RAGFlow's ``SANDBOX_*`` names are honoured with RAGFlow's defaults; execbox's own
settings use the same prefix. A malformed value, or one outside its sane range, stops
start-up with a :class:`~execbox.errors.ConfigurationError` naming the variable, the
value and the accepted form or range. :func:`unknown_variables` names the ``SANDBOX_*``
variables no setting reads (a typo such as ``SANDBOX_TIMOUT``), with the closest known name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from execbox.egress_rules import EgressRule, RuleKind, parse_rules
from execbox.errors import ConfigurationError
from execbox.models import Language, Limits

__all__ = [
    "REPLICA_NAME_PATTERN",
    "BackendChoice",
    "CodeCheckMode",
    "Settings",
    "parse_duration_s",
    "parse_rate",
    "parse_replica_peers",
    "parse_size_bytes",
    "unknown_variables",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(\d+)\s*/\s*(second|minute|hour|s|m|h)")
_RATE_PERIODS_S = {"second": 1.0, "s": 1.0, "minute": 60.0, "m": 60.0, "hour": 3600.0, "h": 3600.0}

DURATION_FORM = "a duration such as 500ms, 10s, 2m or 1m30s"
SIZE_FORM = "a size such as 512k, 256m or 1g (units b, k, m, g)"
#: one SANDBOX_PACKAGES entry: an npm or PyPI name, optionally with its language
_ALLOWED_PACKAGE = re.compile(
    rf"(?:(?:{'|'.join(map(re.escape, Language))}):)?(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*"
)
RATE_FORM = "a rate such as 100/minute, 10/second or 1000/hour, or empty for no limit"


def parse_duration_s(value: Any) -> float:
    """``"1m30s"`` -> 90.0; a bare number is seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            seconds = sum(float(n) * _DURATION_FACTORS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"{value!r} is not {DURATION_FORM}")
    if seconds <= 0:
        raise ValueError(f"{value!r} is not {DURATION_FORM} (must be above zero)")
    return seconds


def parse_size_bytes(value: Any) -> int:
    """``"256m"`` -> 268435456; a bare number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not {SIZE_FORM}")
        size = int(float(match.group(1)) * _SIZE_FACTORS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{value!r} is not {SIZE_FORM} (must be above zero)")
    return size


def parse_rate(value: Any) -> tuple[int, float] | None:
    """``"100/minute"`` -> (100, 60.0); empty or ``off`` -> None."""
    text = str(value or "").strip().lower()
    if text in ("", "off", "none", "0"):
        return None
    match = _RATE.fullmatch(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not {RATE_FORM}")
    return int(match.group(1)), _RATE_PERIODS_S[match.group(2)]


#: a replica's name (e.g. a pod's): what stands before the last "." of its session ids, and
#: in the host name of SANDBOX_REPLICA_URL_TEMPLATE (never a "/", ":" or "@")
REPLICA_NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?")
PEERS_FORM = "name=url pairs separated by commas, such as a=http://10.0.0.5:9385,b=http://10.0.0.6:9385"


def _is_http_url(text: str) -> bool:
    scheme, _, rest = text.partition("://")
    return scheme in ("http", "https") and bool(rest) and not rest.startswith("/")


def parse_replica_peers(value: Any) -> dict[str, str]:
    """``"a=http://h1:9385,b=http://h2:9385"`` -> {"a": "http://h1:9385", "b": "http://h2:9385"}."""
    peers: dict[str, str] = {}
    for item in str(value or "").split(","):
        if not item.strip():
            continue
        name, sep, url = (part.strip() for part in item.partition("="))
        if not sep or not REPLICA_NAME_PATTERN.fullmatch(name) or not _is_http_url(url):
            raise ValueError(f"{item.strip()!r} is not name=http(s)://host:port (the whole value: {PEERS_FORM})")
        peers[name] = url.rstrip("/")
    return peers


Duration = Annotated[float, BeforeValidator(parse_duration_s)]
Size = Annotated[int, BeforeValidator(parse_size_bytes)]

_K, _M, _G = 1 << 10, 1 << 20, 1 << 30
#: sane ranges (inclusive) of the sizes and durations: below or above them is a mistake
SIZE_RANGES: dict[str, tuple[int, int]] = {
    "max_memory": (16 * _M, 1 << 40),
    "max_output": (1 * _K, 1 * _G),
    "max_disk": (1 * _M, 64 * _G),
    "max_code_size": (1 * _K, 32 * _M),
    "max_body_size": (64 * _K, 1 * _G),
    "packages_cache_size": (16 * _M, 1 << 40),
    "egress_max_bytes": (1 * _K, 1 << 40),
}
DURATION_RANGES_S: dict[str, tuple[float, float]] = {
    "timeout": (0.01, 86400.0),
    "pool_wait": (0.001, 3600.0),
    "body_timeout": (0.1, 3600.0),
    "packages_install_timeout": (1.0, 3600.0),
    "egress_max_connection_time": (0.1, 86400.0),
}
#: settings whose value is a secret: never in an error message, a log line or an answer
SECRET_SETTINGS = frozenset({"api_keys", "redis_url"})
#: SANDBOX_* names RAGFlow's side reads (its docker/.env), which execbox leaves alone in silence
RAGFLOW_ONLY_VARIABLES = frozenset({"SANDBOX_ENABLED", "SANDBOX_HOST", "SANDBOX_EXECUTOR_MANAGER_IMAGE"})


def _size_text(size: int) -> str:
    for unit, factor in (("g", _G), ("m", _M), ("k", _K)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


class BackendChoice(StrEnum):
    AUTO = "auto"
    GVISOR = "gvisor"
    NAMESPACES = "namespaces"


class CodeCheckMode(StrEnum):
    """Static inspection before a run (docs/code-check.md): ``block`` RAGFlow's rules,
    ``guard`` only processes, native code, dynamic code and interpreter internals (both
    reject with -999), ``warn`` logs what ``block`` would reject, ``off`` skips it."""

    BLOCK = "block"
    GUARD = "guard"
    WARN = "warn"
    OFF = "off"


class Settings(BaseSettings):
    """Every setting of execbox; the environment variable is ``SANDBOX_`` + the field name in capitals."""

    model_config = SettingsConfigDict(
        env_prefix="SANDBOX_", env_file=".env", extra="ignore", frozen=True, case_sensitive=False
    )

    # RAGFlow's names and defaults
    executor_manager_port: int = Field(9385, ge=1, le=65535, description="HTTP port of the service")
    executor_manager_pool_size: int = Field(5, ge=0, le=256, description="warm sandboxes kept ready per language")
    timeout: Duration = Field(10.0, description="wall-time limit of one execution")
    max_memory: Size = Field(256 << 20, description="memory limit of one execution")
    enable_seccomp: bool = Field(False, description="apply seccomp-profile-default.json (gvisor backend)")
    base_python_image: str = Field("sandbox-base-python:latest", description="docker backend only (not built yet)")
    base_nodejs_image: str = Field("sandbox-base-nodejs:latest", description="docker backend only (not built yet)")

    # execbox's own
    backend: BackendChoice = Field(BackendChoice.AUTO, description="auto | gvisor | namespaces")
    code_check: CodeCheckMode = Field(
        CodeCheckMode.BLOCK,
        description="static inspection: block (RAGFlow's rules) | guard (recommended for agents) | warn | off; see docs/code-check.md",
    )
    max_output: Size = Field(1 << 20, description="cap on stdout + stderr of one execution")
    max_disk: Size = Field(64 << 20, description="size of the sandbox's working directory (tmpfs)")
    max_pids: int = Field(128, ge=8, le=4096, description="processes + threads per execution")
    cpus: float = Field(1.0, gt=0, le=64, description="CPU share of one execution, in cores")
    pool_wait: Duration = Field(10.0, description="how long a request waits for a free sandbox")
    rate_limit: str = Field("", description="per-client request rate, e.g. 100/minute; empty = off")
    max_code_size: Size = Field(1 << 20, description="largest accepted source (HTTP 413 above)")
    max_body_size: Size = Field(
        16 << 20,
        description="largest request body, JSON or a session file upload (HTTP 413 above, chunked or not); "
        "at least the base64 of SANDBOX_MAX_CODE_SIZE plus 64k",
    )
    body_timeout: Duration = Field(
        30.0, description="a request body must arrive in full within this time (HTTP 408 and the connection closed)"
    )
    enable_network: bool = Field(
        False, description="same as SANDBOX_EGRESS_ALLOW=* (any public address, through the egress proxy)"
    )
    egress_allow: str = Field(
        "",
        description="destinations sandboxes may reach through the egress proxy: comma-separated api.github.com, "
        "*.pypi.org, host:port, IP or CIDR; empty = no network; see docs/egress.md",
    )
    egress_max_connections: int = Field(
        64, ge=1, le=100000, description="connections one execution may open through the egress proxy"
    )
    egress_max_bytes: Size = Field(64 << 20, description="bytes (both directions) one execution may move through the egress proxy")
    egress_max_connection_time: Duration = Field(
        60.0, description="longest life of one connection through the egress proxy"
    )
    state_dir: Path = Field(Path("/var/lib/execbox"), description="runtime environments and sandbox state")
    uid_base: int = Field(60001, ge=1000, description="first uid/gid of sandboxes (one per live sandbox)")
    uid_count: int = Field(1000, ge=16, description="size of the sandbox uid range")
    python_preload: str = Field(
        "numpy,pandas,matplotlib.pyplot", description="modules the Python fork server imports once for all sandboxes",
    )
    python_light: bool = Field(
        True,
        description="Python code that imports only the standard library runs in sandboxes without the preloaded "
        "modules, from a second pool of the same size (cheaper to prepare, most of all under gVisor), where sandboxes "
        "are forked from a fork server (namespaces, gVisor with two walls)",
    )
    forkserver: bool = Field(True, description="Python sandboxes are forked from a warm fork server (namespaces backend)")
    gvisor_platform: str = Field("auto", description="runsc platform: auto (ptrace, else systrap) | ptrace | systrap | kvm")
    gvisor_executions_per_sandbox: int = Field(
        100, ge=1, le=100000,
        description="executions one long-lived gVisor sandbox serves, each in a fresh inner sandbox (1 = single-use)",
    )
    gvisor_sandbox_lifetime: Duration = Field(600.0, description="longest life of one long-lived gVisor sandbox")
    languages: str = Field(
        "python,nodejs", description="languages served (comma-separated); each needs its runtime environment built"
    )
    max_sessions: int = Field(32, ge=0, le=4096, description="live sessions in all (each holds a sandbox); 0 = sessions off")
    session_idle_timeout: Duration = Field(600.0, description="a session unused this long is closed")
    session_max_lifetime: Duration = Field(3600.0, description="a session is closed this long after it was made")
    replica_name: str = Field(
        "", pattern=rf"^(?:{REPLICA_NAME_PATTERN.pattern})?$",
        description="this replica's name, the prefix of its session ids (e.g. the pod name); empty = one replica",
    )
    replica_url_template: str = Field(
        "",
        description="address of another replica, {replica} standing for its name (e.g. http://{replica}.execbox-peers:9385):"
        " calls for its sessions are forwarded there; see docs/kubernetes.md",
    )
    replica_peers: str = Field(
        "", description="name=url,... of the other replicas (static setups); looked up before the template"
    )
    queue_max: int = Field(
        100, ge=0, le=100_000,
        description="requests that may wait for a sandbox, per pool (one per language, and Python's light pool); "
        "one more is refused at once "
        "(-10 on /run, 503 on /v1); 0 = none waits",
    )
    api_keys_file: str = Field(
        "", description="file of API keys, one name:key a line; when set (or SANDBOX_API_KEYS), every endpoint "
        "but /, /healthz, /livez and /metrics needs a key; see docs/tenancy.md",
    )
    api_keys: SecretStr = Field(SecretStr(""), description="API keys in the environment: name:key,name:key")
    run_without_key: bool = Field(False, description="/run needs no key even when keys are on (RAGFlow on a private network)")
    key_max_concurrent: int = Field(0, ge=0, le=100_000, description="executions one key runs at once; 0 = no limit")
    key_rate: str = Field("", description="requests per key, e.g. 600/minute; empty = off")
    key_max_sessions: int = Field(0, ge=0, le=100_000, description="live sessions per key; 0 = no limit")
    redis_url: SecretStr = Field(
        SecretStr(""), description="Redis that replicas share the rate and concurrency quotas through "
        "(redis://host:6379/0); empty = each process on its own",
    )
    packages: str = Field(
        "off",
        description="packages a request may install (docs/packages.md): off | any | an allowlist of names, "
        "comma-separated, each optionally python: or nodejs:",
    )
    packages_cache_size: Size = Field(2 * _G, description="disk the package layers may take; least recently used go first")
    packages_install_timeout: Duration = Field(120.0, description="longest installation of one request's packages")
    bind_host: str = Field("0.0.0.0", description="address the HTTP service listens on")
    log_level: str = Field("info", description="debug | info | warning | error")

    @field_validator(*SIZE_RANGES)
    @classmethod
    def _size_in_range(cls, value: int, info: Any) -> int:
        low, high = SIZE_RANGES[info.field_name]
        if not low <= value <= high:
            raise ValueError(f"{_size_text(value)} is outside the sane range {_size_text(low)} to {_size_text(high)}")
        return value

    @field_validator(*DURATION_RANGES_S)
    @classmethod
    def _duration_in_range(cls, value: float, info: Any) -> float:
        low, high = DURATION_RANGES_S[info.field_name]
        if not low <= value <= high:
            raise ValueError(f"{value:g}s is outside the sane range {low:g}s to {high:g}s")
        return value

    @model_validator(mode="after")
    def _uids_fit(self) -> Settings:
        if self.uid_base + self.uid_count > (1 << 32) - 2:
            raise ValueError(
                f"SANDBOX_UID_BASE + SANDBOX_UID_COUNT = {self.uid_base + self.uid_count} is beyond the largest uid"
            )
        return self

    @model_validator(mode="after")
    def _body_holds_code(self) -> Settings:
        needed = 4 * -(-self.max_code_size // 3) + 64 * _K  # the code as base64, and room for the rest
        if self.max_body_size < needed:
            raise ValueError(
                f"SANDBOX_MAX_BODY_SIZE={_size_text(self.max_body_size)} cannot carry a request with "
                f"SANDBOX_MAX_CODE_SIZE={_size_text(self.max_code_size)} of code: set it to at least {_size_text(needed)}"
            )
        return self

    @field_validator("rate_limit", "replica_peers", "key_rate", "egress_allow")
    @classmethod
    def _check_parses(cls, value: str, info: Any) -> str:
        parsers = {"rate_limit": parse_rate, "key_rate": parse_rate, "replica_peers": parse_replica_peers,
                   "egress_allow": parse_rules}  # fmt: skip
        parsers[info.field_name](value)
        return value

    @field_validator("languages")
    @classmethod
    def _check_languages(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        known = [language.value for language in Language]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise ValueError(f"{value!r} must name one or more of {', '.join(known)}, comma-separated")
        return ",".join(dict.fromkeys(names))

    @field_validator("packages")
    @classmethod
    def _check_packages(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("off", "any"):
            return text
        names = [name.strip() for name in text.split(",") if name.strip()]
        bad = [name for name in names if not _ALLOWED_PACKAGE.fullmatch(name)]
        if bad or not names:
            raise ValueError(
                f"{value!r} is not off, any, or a comma-separated list of package names "
                f"(each optionally prefixed {' or '.join(f'{language}:' for language in Language)})"
            )
        return ",".join(dict.fromkeys(names))

    @property
    def packages_allowed(self) -> frozenset[str] | None:
        """SANDBOX_PACKAGES as a set of ``[language:]name`` (empty: off); None for ``any``."""
        if self.packages == "any":
            return None
        return frozenset() if self.packages == "off" else frozenset(self.packages.split(","))

    @property
    def served_languages(self) -> tuple[Language, ...]:
        """The languages of SANDBOX_LANGUAGES, in order."""
        return tuple(Language(name) for name in self.languages.split(","))

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("not a Redis URL: redis://[:password@]host:port/db, rediss://... or unix:///path")
        return SecretStr(url)

    @field_validator("gvisor_platform")
    @classmethod
    def _check_platform(cls, value: str) -> str:
        if value.lower() not in ("auto", "systrap", "ptrace", "kvm"):
            raise ValueError(f"{value!r} is not one of auto, systrap, ptrace, kvm")
        return value.lower()

    @field_validator("replica_url_template")
    @classmethod
    def _check_replica_template(cls, value: str) -> str:
        if value and ("{replica}" not in value or not _is_http_url(value.replace("{replica}", "replica"))):
            raise ValueError(f"{value!r} is not an http(s) URL with {{replica}} in it, such as http://{{replica}}.execbox-peers:9385")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"{value!r} is not one of debug, info, warning, error")
        return value.lower()

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
        """Read the environment and ``env_file`` (``.env`` by default); a bad value raises
        ConfigurationError naming it."""
        if env_file is not None and env_file != ".env" and not Path(env_file).is_file():
            raise ConfigurationError(f"the settings file {str(env_file)!r} does not exist")
        try:
            return cls(_env_file=env_file, **overrides)  # type: ignore[call-arg]
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                if not err["loc"]:  # a check across settings: the message names them
                    lines.append(message)
                    continue
                name = "SANDBOX_" + "_".join(str(p) for p in err["loc"]).upper()
                shown = "(secret, not shown)" if err["loc"][0] in SECRET_SETTINGS else repr(err.get("input"))
                lines.append(f"{name}={shown}: {message}")
            raise ConfigurationError("invalid setting: " + "; ".join(lines)) from exc

    @property
    def runtime_dir(self) -> Path:
        return self.state_dir / "runtimes"

    @property
    def rate(self) -> tuple[int, float] | None:
        return parse_rate(self.rate_limit)

    @property
    def replica_peer_urls(self) -> dict[str, str]:
        return parse_replica_peers(self.replica_peers)

    @property
    def key_rate_limit(self) -> tuple[int, float] | None:
        return parse_rate(self.key_rate)

    @property
    def keys_enabled(self) -> bool:
        """API keys are on: a keys file or inline keys are set."""
        return bool(self.api_keys_file.strip() or self.api_keys.get_secret_value().strip())

    @property
    def preload_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.python_preload.split(",") if m.strip())

    @property
    def egress_rules(self) -> tuple[EgressRule, ...]:
        """SANDBOX_EGRESS_ALLOW, plus ``*`` with SANDBOX_ENABLE_NETWORK; empty: no network."""
        rules = parse_rules(self.egress_allow)
        if self.enable_network and not any(r.kind is RuleKind.ANY and r.port is None for r in rules):
            rules = (*rules, parse_rules("*")[0])
        return rules

    def default_limits(self) -> Limits:
        return Limits(
            wall_time_s=self.timeout,
            memory_bytes=self.max_memory,
            output_bytes=self.max_output,
        )


def _dotenv_names(env_file: str | Path | None) -> list[str]:
    if env_file is None:
        return []
    from dotenv import dotenv_values  # what pydantic-settings reads .env with

    path = Path(env_file)
    return list(dotenv_values(path)) if path.is_file() else []


def unknown_variables(environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> list[str]:
    """One warning per ``SANDBOX_*`` variable (environment or ``env_file``) that no setting
    reads, naming the closest known variable when there is one."""
    known = ["SANDBOX_" + name.upper() for name in Settings.model_fields]
    seen: dict[str, str] = {}
    for name in (os.environ if environ is None else environ):
        seen.setdefault(name, "the environment")
    for name in _dotenv_names(env_file):
        seen.setdefault(name, str(env_file))
    warnings = []
    for name, where in seen.items():
        upper = name.upper()
        if not upper.startswith("SANDBOX_") or upper in known or upper in RAGFLOW_ONLY_VARIABLES:
            continue
        suffixes = [k.removeprefix("SANDBOX_") for k in known]
        close = difflib.get_close_matches(upper.removeprefix("SANDBOX_"), suffixes, n=1, cutoff=0.6)
        hint = f"; did you mean SANDBOX_{close[0]}?" if close else ""
        warnings.append(f"unknown setting {name} (in {where}) is ignored{hint}")
    return warnings
