"""
One frozen configuration, read from options, then the environment, then defaults.

Every setting has one L{Setting} row: its option name, its environment
variable (the original proxy's names where it had one), its default, a parser
and a one-line help text.  C{twistd proxycache --help} is generated from the
same table, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message says which and why."""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("must be a number") from None


def _ratio(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def _share(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be in [0, 1]")
    return value


def _seconds(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _urls(text: str) -> tuple[str, ...]:
    urls = tuple(backend_url(u) for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError("needs at least one URL")
    return urls


def backend_url(text: str) -> str:
    """A llama-server's base URL, without its trailing slash; ValueError says what is wrong with it."""
    url = text.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http(s) URL")
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{url!r}: its port is not a port number") from None
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if ":" in parts.hostname:
        # treq cannot send to one (hyperlink IDNA-encodes the host): every request would fail.
        raise ValueError(f"{url!r}: IPv6 addresses are not supported here; name a host that resolves to it")
    return url


def _url_keys(text: str) -> tuple[tuple[str, str | None], ...]:
    """C{URL=KEY} items (whitespace or comma separated); C{URL=} says: no key for that backend."""
    pairs = []
    for item in text.replace(",", " ").split():
        url, equals, key = item.partition("=")
        if not equals:
            raise ValueError(f"{item!r} is not URL=KEY")
        pairs.append((backend_url(url), key or None))
    return tuple(pairs)


def _bytes_or_auto(text: str) -> int | None:
    """A byte count, or "auto" (None): a share of the save directory's free space."""
    if text.strip().lower() == "auto":
        return None
    return _non_negative_int(text)


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.replace(",", " ").split() if w)


def _optional_text(text: str) -> str | None:
    return text or None


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    """C{tenant=weight} pairs, comma or space separated."""
    pairs = []
    for word in _words(text):
        name, sep, value = word.rpartition("=")
        if not sep or not name:
            raise ValueError(f"{word!r} is not tenant=weight")
        weight = _float(value)
        if weight <= 0:
            raise ValueError(f"{word!r}: a weight must be positive")
        pairs.append((name, weight))
    return tuple(pairs)


def _discipline(text: str) -> str:
    value = text.strip().lower()
    if value not in ("fair", "fifo"):
        raise ValueError("must be fair or fifo")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return str(Path(base) / "proxycache")


@attrs.frozen
class Setting:
    name: str  # attribute of Config and option name with '_' -> '-'
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "PROXY_LISTEN", "tcp:8081:interface=127.0.0.1", str,
            "Twisted endpoint string to listen on"),
    Setting("llama_url", "LLAMA_SERVER_URL", ("http://127.0.0.1:8080",), _urls,
            "llama-server base URL(s), comma separated"),
    Setting("slots", "SLOTS_COUNT", None, _positive_int,
            "slots per llama-server (default: its /props total_slots)"),
    Setting("similarity_min_ratio", "SIMILARITY_MIN_RATIO", 0.85, _ratio,
            "common-prefix ratio a cached prefix needs to be reused"),
    Setting("min_prefix_chars", "MIN_PREFIX_CHARS", 2000, _non_negative_int,
            "requests with fewer characters are small"),
    Setting("min_prefix_words", "MIN_PREFIX_WORDS", 300, _non_negative_int,
            "requests with fewer words are small (a word longer than 32 characters counts once per 32)"),
    Setting("min_prefix_blocks", "MIN_PREFIX_BLOCKS", 16, _non_negative_int,
            "requests with fewer word blocks are small"),
    Setting("block_words", "BLOCK_WORDS", 16, _positive_int,
            "words per fingerprint block"),
    Setting("affinity_wait", "AFFINITY_WAIT_SECONDS", 30.0, _seconds,
            "how long a follow-up waits for its busy hot slot"),
    Setting("max_queue", "MAX_QUEUE", 64, _non_negative_int,
            "requests allowed to wait for a slot before 429"),
    Setting("queue_timeout", "QUEUE_TIMEOUT_SECONDS", 30.0, _seconds,
            "how long a request waits for a ready llama-server (none known yet, or all down) before "
            "503 + Retry-After"),
    Setting("max_body_bytes", "MAX_BODY_BYTES", 32 * 1024 * 1024, _positive_int,
            "largest request body accepted (413 above)"),
    Setting("first_byte_timeout", "UPSTREAM_TIMEOUT", 1800.0, _seconds,
            "seconds to wait for llama-server's response headers (prefill included)"),
    Setting("stream_idle_timeout", "STREAM_IDLE_TIMEOUT", 300.0, _seconds,
            "seconds a response body may stall before 504 / an error event"),
    Setting("client_stall_timeout", "CLIENT_STALL_TIMEOUT", 60.0, _seconds,
            "seconds a client may take none of a response before its connection is closed (its slot freed)"),
    Setting("slot_action_timeout", "SLOT_ACTION_TIMEOUT", 300.0, _seconds,
            "seconds a slot save or restore may take"),
    Setting("meta_dir", "LOCAL_META_DIR", None, str,
            "directory of the proxy's .meta index (default: $XDG_STATE_HOME/proxycache/meta)"),
    Setting("slot_save_path", "SLOT_SAVE_PATH", None, _optional_text,
            "llama-server's --slot-save-path, when this host can see it"),
    Setting("max_cache_bytes", "MAX_CACHE_BYTES", None, _bytes_or_auto,
            "disk budget for saved caches: bytes, 0 = unlimited, or auto = half the free space at start "
            "(needs --slot-save-path)"),
    Setting("max_cache_entries", "MAX_CACHE_ENTRIES", 0, _non_negative_int,
            "most saved caches kept, 0 = unlimited"),
    Setting("pinned_keys", "PINNED_KEYS", (), _words,
            "conversation keys never evicted from disk"),
    Setting("write_behind", "WRITE_BEHIND_SECONDS", 2.0, _seconds,
            "idle seconds before a changed hot slot is saved in the background"),
    Setting("api_keys", "PROXY_API_KEYS", (), _words,
            "API keys clients must send as 'Authorization: Bearer' (none = open)"),
    Setting("upstream_api_key", "LLAMA_API_KEY", None, _optional_text,
            "key sent to each --llama-url llama-server when it runs with --api-key (see --backend-api-keys)"),
    Setting("backend_api_keys", "BACKEND_API_KEYS", (), _url_keys,
            "a key per --llama-url backend, as URL=KEY items (URL= for none); others get --upstream-api-key"),
    Setting("health_interval", "HEALTH_INTERVAL", 5.0, _seconds,
            "seconds between checks of llama-server's health and slots"),
    Setting("grace", "GRACE_SECONDS", 30.0, _seconds,
            "on stop, how long requests in flight may take to finish"),
    Setting("log_prompts", "LOG_PROMPTS", False, _flag,
            "log the start of each request's last message (debugging only: private text)"),
    Setting("llama_model", "LLAMA_MODEL", None, _optional_text,
            "GGUF to serve with an embedded llama.cpp (xllamacpp)"),
    Setting("demo", "PROXYCACHE_DEMO", False, _flag,
            "serve a generated random-weight model with an embedded llama.cpp"),
    Setting("ctx_per_slot", "CTX_PER_SLOT", 16384, _positive_int,
            "context per slot of the embedded llama.cpp"),
    Setting("backend_save_dirs", "BACKEND_SAVE_DIRS", (), _words,
            "each --llama-url's --slot-save-path as this host sees it, in order; backends naming one "
            "directory restore each other's caches (default: all share --slot-save-path when it is set)"),
    Setting("admin_keys", "PROXY_ADMIN_KEYS", (), _words,
            "keys allowed to add, drain and remove backends at run time (none = no admin routes)"),
    Setting("fim_slots", "FIM_SLOTS", None, _non_negative_int,
            "slots per llama-server kept for /infill (default: 1 with 3 slots or more, else 0 = shared)"),
    Setting("cors_origins", "CORS_ORIGINS", (), _words,
            "browser origins allowed to call the proxy ('*' for any); other pages' requests are refused (403)"),
    Setting("allowed_hosts", "ALLOWED_HOSTS", (), _words,
            "Host names accepted on a loopback connection besides localhost, 127.0.0.1 and [::1] ('*' for any); "
            "others are refused (403), which defeats DNS rebinding"),
    Setting("health_requires_key", "HEALTH_REQUIRES_KEY", False, _flag,
            "with --api-keys, /health, /v1/health and /proxycache/health need a key too (off: load balancers "
            "and uptime probes, which send none, get an answer)"),
    Setting("allow_client_pins", "ALLOW_CLIENT_PINS", False, _flag,
            "honour clients' X-Proxycache-Pin header (off: only --pinned-keys pin)"),
    Setting("max_pinned_share", "MAX_PINNED_SHARE", 0.5, _share,
            "share of the disk budget pinned caches may hold; beyond it the oldest are evictable"),
    Setting("tenant_header", "TENANT_HEADER", None, _optional_text,
            "request header naming the tenant when no API keys are set (e.g. X-User; default: the body's "
            "user field, else the client address)"),
    Setting("queue_discipline", "QUEUE_DISCIPLINE", "fair", _discipline,
            "waiting requests served 'fair' across tenants (weighted by prompt size) or 'fifo'"),
    Setting("tenant_weights", "TENANT_WEIGHTS", (), _weights,
            "tenant=weight pairs for the fair queue (e.g. key1=2,user:ci=0.5; default weight 1)"),
    Setting("tenant_max_in_flight", "TENANT_MAX_IN_FLIGHT", 0, _non_negative_int,
            "slots one tenant may hold at once; more wait in the queue (0 = no limit)"),
    Setting("tenant_max_queued", "TENANT_MAX_QUEUED", 0, _non_negative_int,
            "requests one tenant may have waiting; more are refused with 429 (0 = no limit)"),
    Setting("side_call_wait", "SIDE_CALL_WAIT", 3.0, _seconds,
            "seconds a small request waits rather than evict a conversation in use or used that recently"),
    Setting("isolate_tenants", "ISOLATE_TENANTS", False, _flag,
            "no prefix reuse, fork or restore across tenants (a slot another tenant used is erased first)"),
    Setting("tenant_disk_share", "TENANT_DISK_SHARE", 1.0, _share,
            "share of the disk budget one tenant's saved caches may hold (1 = no limit)"),
    Setting("fim_idle", "FIM_IDLE_SECONDS", 30.0, _seconds,
            "seconds without FIM requests after which a slot holding FIM goes back to chat"),
)



@attrs.frozen(kw_only=True)
class Config:
    listen: str
    llama_url: tuple[str, ...]
    slots: int | None
    similarity_min_ratio: float
    min_prefix_chars: int
    min_prefix_words: int
    min_prefix_blocks: int
    block_words: int
    affinity_wait: float
    max_queue: int
    max_body_bytes: int
    first_byte_timeout: float
    stream_idle_timeout: float
    client_stall_timeout: float
    slot_action_timeout: float
    meta_dir: str
    slot_save_path: str | None
    max_cache_bytes: int | None  # None: auto, chosen at start from the free space
    max_cache_entries: int
    pinned_keys: tuple[str, ...]
    write_behind: float
    api_keys: tuple[str, ...]
    upstream_api_key: str | None
    health_interval: float
    grace: float
    log_prompts: bool
    llama_model: str | None
    demo: bool
    ctx_per_slot: int
    admin_keys: tuple[str, ...]
    backend_save_dirs: tuple[str, ...] = ()
    backend_api_keys: tuple[tuple[str, str | None], ...] = ()
    fim_slots: int | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    health_requires_key: bool = False
    allow_client_pins: bool = False
    max_pinned_share: float = 0.5
    queue_timeout: float = 30.0
    tenant_header: str | None = None
    queue_discipline: str = "fair"
    tenant_weights: tuple[tuple[str, float], ...] = ()
    tenant_max_in_flight: int = 0
    tenant_max_queued: int = 0
    side_call_wait: float = 3.0
    fim_idle: float = 30.0
    isolate_tenants: bool = False
    tenant_disk_share: float = 1.0

    @property
    def embedded(self) -> bool:
        return bool(self.llama_model or self.demo)

    @classmethod
    def load(
        cls,
        options: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
        file: Mapping[str, str] | None = None,
    ) -> "Config":
        """
        Build a config; C{options} (by setting name) win over C{environ}, which
        wins over C{file} (see L{read_config_file}), which wins over the defaults.

        @raise ConfigError: naming the first setting whose value is unusable.
        """
        return cls(**{name: value for name, (value, _) in resolve(options, environ, file).items()})



def resolve(
    options: Mapping[str, str | None] | None,
    environ: Mapping[str, str] | None,
    file: Mapping[str, str] | None,
) -> dict[str, tuple[Any, str]]:
    """Every setting's value and where it came from ("option", "env", "file" or "default")."""
    options = options or {}
    environ = os.environ if environ is None else environ
    file = file or {}
    resolved: dict[str, tuple[Any, str]] = {}
    for setting in SETTINGS:
        for raw, source, label in (
            (options.get(setting.name), "option", f"--{setting.option}"),
            (environ.get(setting.env), "env", setting.env),
            (file.get(setting.name), "file", f"{setting.name} in the config file"),
        ):
            if raw is not None:
                try:
                    resolved[setting.name] = (setting.parse(str(raw)), source)
                except ValueError as e:
                    raise ConfigError(f"{label}={raw!r}: {e}") from None
                break
        else:
            resolved[setting.name] = (setting.default, "default")
    if resolved["meta_dir"][0] is None:
        resolved["meta_dir"] = (str(Path(_default_state_dir()) / "meta"), "default")
    return resolved


def read_config_file(path: str) -> dict[str, str]:
    """
    The C{[proxycache]} section of an INI file, keyed by setting name; keys may
    be written as setting names, option names or environment variable names.
    """
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not parser.has_section("proxycache"):
        raise ConfigError(f"config file {path}: no [proxycache] section")
    by_alias = {}
    for setting in SETTINGS:
        for alias in (setting.name, setting.option, setting.env.lower()):
            by_alias[alias] = setting.name
    values = {}
    for key, value in parser.items("proxycache"):
        if key not in by_alias:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[by_alias[key]] = value
    return values


def save_storage(config: Config) -> dict[str, str]:
    """
    Each backend's save directory as this host sees it (by backend URL): backends
    naming one directory can restore each other's caches.

    @raise ConfigError: C{--backend-save-dirs} does not name one directory per URL.
    """
    if config.backend_save_dirs:
        if len(config.backend_save_dirs) != len(config.llama_url):
            raise ConfigError(
                f"--backend-save-dirs names {len(config.backend_save_dirs)} directories for "
                f"{len(config.llama_url)} --llama-url backends: one each, in order"
            )
        return {url: os.path.realpath(d) for url, d in zip(config.llama_url, config.backend_save_dirs)}
    if config.slot_save_path:
        return {url: os.path.realpath(config.slot_save_path) for url in config.llama_url}
    return {}


def upstream_keys(config: Config) -> dict[str, str | None]:
    """
    The key each C{--llama-url} backend is sent (by URL): its own from
    C{--backend-api-keys}, else C{--upstream-api-key}.

    @raise ConfigError: C{--backend-api-keys} names a URL that is not a C{--llama-url}.
    """
    own = dict(config.backend_api_keys)
    unknown = [url for url in own if url not in config.llama_url]
    if unknown:
        raise ConfigError(f"--backend-api-keys names {', '.join(unknown)}, not among the --llama-url backends")
    return {url: own[url] if url in own else config.upstream_api_key for url in config.llama_url}
