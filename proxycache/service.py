"""
C{twistd proxycache}: options and the service tree.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from proxycache import __version__
from proxycache.config import (
    SETTINGS, Config, ConfigError, _flag, read_config_file, resolve, save_storage, upstream_keys,
)

if TYPE_CHECKING:
    from proxycache.backend import Backend
    from proxycache.cache import Catalog, DiskTier
    from proxycache.slots import Dispatcher, Fleet, Monitor, ReadyGate, Scheduler
    from proxycache.stats import Stats
    from proxycache.web import Proxy
    from proxycache.web._inflight import InFlight

log = Logger()

# On stop, after the drain: time for the last buffered bytes to reach the kernel.
FLUSH_PAUSE = 0.2


def _describe(setting) -> str:
    default = setting.default
    if isinstance(default, tuple):
        default = ",".join(default) or "none"
    elif default is None:
        default = {"slots": "from llama-server", "max_cache_bytes": "auto"}.get(setting.name, "none")
    return f"{setting.help} [env {setting.env}; default {default}]"


class Options(usage.Options):
    """proxycache: a KV-cache-aware proxy in front of llama.cpp's llama-server."""

    synopsis = "[options]"
    longdesc = (
        "Routes OpenAI Chat Completions to the llama.cpp slot whose cached prompt "
        "matches best, saving and restoring slot caches on disk. Each option can "
        "also be set by the environment variable named in its help, or in the "
        "[proxycache] section of a --config file; options win over the "
        "environment, which wins over the file."
    )
    optFlags = [[s.option, None, _describe(s)] for s in SETTINGS if s.parse is _flag] + [
        ["version", None, "print the version and exit"],
        ["print-config", None, "print the effective configuration, with where each value came from, and exit"],
    ]
    optParameters = [[s.option, None, None, _describe(s)] for s in SETTINGS if s.parse is not _flag] + [
        ["config", None, None, "INI file with a [proxycache] section [env PROXYCACHE_CONFIG]"],
    ]

    config: Config

    def opt_version(self) -> None:
        print(f"proxycache {__version__}")
        sys.exit(0)

    def _resolve(self) -> dict[str, tuple[Any, str]]:
        given = {
            s.name: ("true" if self[s.option] else None) if s.parse is _flag else self[s.option]
            for s in SETTINGS
        }
        path = self["config"] or os.environ.get("PROXYCACHE_CONFIG")
        file = read_config_file(path) if path else {}
        return resolve(given, os.environ, file)

    def reread(self) -> Config:
        """The configuration as the options, the environment and the file say now (for SIGHUP)."""
        return Config(**{name: value for name, (value, _) in self._resolve().items()})

    def postOptions(self) -> None:
        try:
            resolved = self._resolve()
            self.config = Config(**{name: value for name, (value, _) in resolved.items()})
            save_storage(self.config)
            upstream_keys(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e))
        if self["print-config"]:
            for setting in SETTINGS:
                value, source = resolved[setting.name]
                if setting.name in ("api_keys", "upstream_api_key") and value:
                    value = "(set)"
                elif setting.name == "backend_api_keys" and value:
                    value = " ".join(f"{url}={'(set)' if key else ''}" for url, key in value)
                elif setting.name == "max_cache_bytes" and value is None:
                    value = "auto"
                print(f"{setting.option} = {value!r}  [{source}]")
            sys.exit(0)
        check_listen(self.config.listen)


def check_listen(listen: str) -> None:
    """
    A C{systemd:} endpoint needs the socket systemd passes (socket activation): say so in one
    line rather than with the traceback of an empty descriptor list.
    """
    if listen.startswith("systemd:"):
        from twisted.internet import endpoints, reactor

        try:  # Twisted reads (and removes) LISTEN_FDS when it loads: ask its parser
            endpoints.serverFromString(reactor, listen)
        except (IndexError, KeyError):
            raise usage.UsageError(
                f"--listen {listen}: systemd passed no socket (LISTEN_FDS); start it through its socket unit "
                "(systemctl start proxycache.socket), or listen with tcp:PORT"
            )


def makeService(options: Any) -> IService:
    from twisted.internet import reactor

    if isinstance(options, Config):
        return build(options, reactor)
    return build(options.config, reactor, reread=options.reread)


class OrderedServices(MultiService):
    """
    Starts children in order and stops them one at a time in reverse order,
    each waiting for the one after it: the listening port closes first, the
    disk tier flushes while llama.cpp is still up, llama.cpp stops last.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_reverse())

    async def _stop_in_reverse(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class DrainService(Service):
    """
    On stop (after the port closed): let requests in flight finish, up to the
    grace period; a second SIGTERM or SIGINT meanwhile exits at once.
    """

    def __init__(
        self, in_flight: InFlight, grace: float, clock: IReactorTime, on_drain: Callable[[], Any] = lambda: None
    ) -> None:
        self.in_flight = in_flight
        self.grace = grace
        self.clock = clock
        self.on_drain = on_drain  # requests waiting for a backend are answered within the grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: os._exit(1))
        self.on_drain()
        if self.in_flight:
            log.info("waiting up to {grace:g}s for {n} requests in flight", grace=self.grace, n=len(self.in_flight))
        left = await self.in_flight.drain(self.grace)
        if left:
            log.warn("stopping with {n} requests still running after the grace period", n=left)
        # Let the transports hand their last buffered bytes to the kernel before
        # the reactor drops every connection.
        await deferLater(self.clock, FLUSH_PAUSE, lambda: None)


class ReloadOnHangup(Service):
    """SIGHUP re-reads the configuration and makes the fleet of backends what it now names."""

    def __init__(self, reread: Callable[[], Config], fleet: Fleet, reactor: Any) -> None:
        self.reread = reread
        self.fleet = fleet
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> None:
        try:
            config = self.reread()
            keys = upstream_keys(config)
        except ConfigError as e:
            log.warn("SIGHUP: configuration not reloaded: {error}", error=e)
            return
        urls = list(config.llama_url)
        log.info("SIGHUP: backends are now {urls} (other settings need a restart)", urls=", ".join(urls))
        try:
            await self.fleet.reconcile(urls, keys)
        except Exception:
            log.failure("SIGHUP: changing the backends failed")


def build(config: Config, reactor: Any, reread: Callable[[], Config] | None = None) -> MultiService:
    """The whole daemon as one service tree, its collaborators passed in, never patched on."""
    from proxycache.backend import Backend, LlamaServer
    from proxycache.web import guarded_site

    top = OrderedServices()
    if config.embedded:
        config = _start_embedded(config, top)
    pool_size = max(8, 4 * (config.slots or 8)) + 4
    keys = upstream_keys(config)

    def connect(url: str, api_key: str | None) -> Backend:
        return LlamaServer.create(reactor, url, api_key, pool_size)

    daemon = wire(config, reactor, [connect(url, keys[url]) for url in config.llama_url], connect)
    daemon.tier.setServiceParent(top)
    daemon.monitor.setServiceParent(top)
    # Requests waiting for a backend go on waiting through the drain (the monitor still looks: a proxy
    # stopped right after it started serves them once its first look is done), answered before it ends.
    drain_wait = max(0.0, config.grace - 2 * FLUSH_PAUSE)
    DrainService(
        daemon.proxy.in_flight, config.grace, reactor, on_drain=lambda: daemon.gate.stop(within=drain_wait)
    ).setServiceParent(top)
    if reread is not None:
        ReloadOnHangup(reread, daemon.fleet, reactor).setServiceParent(top)
    strports.service(config.listen, guarded_site(daemon.proxy.resource(), config)).setServiceParent(top)
    return top


@attrs.frozen
class Wired:
    """The daemon's collaborators, wired; L{build} puts the services among them in its tree."""

    catalog: Catalog
    scheduler: Scheduler
    monitor: Monitor
    gate: ReadyGate
    stats: Stats
    tier: DiskTier
    dispatcher: Dispatcher
    fleet: Fleet
    proxy: Proxy


def wire(
    config: Config, reactor: Any, backends: list[Backend], connect: Callable[[str, str | None], Backend],
    to_thread: Callable[..., Deferred[Any]] = deferToThread,
) -> Wired:
    """
    Every collaborator of the daemon over C{backends}, each given the others it
    needs; C{connect(url, api_key)} makes the backend for a URL added at run
    time; C{to_thread} runs the parsing of a large request body off the
    reactor.  Nothing is started: tests drive the result in process (over fake
    backends).
    """
    from proxycache.cache import Catalog, DiskTier
    from proxycache.slots import Dispatcher, Fleet, Monitor, ReadyGate, Scheduler
    from proxycache.stats import Stats
    from proxycache.web import Proxy
    from proxycache.web._admin import Admin
    from proxycache.web._body import BodyReader

    by_name = {b.name: b for b in backends}
    # Saved entries are judged by the cost model (restore vs recompute of the common part), not by
    # similarity: a team's shared system prompt is worth restoring for another user (issue 13).
    catalog = Catalog(min_ratio=0.0, storage=save_storage(config), isolate_tenants=config.isolate_tenants)
    scheduler = Scheduler(
        reactor,
        min_ratio=config.similarity_min_ratio,
        affinity_wait=config.affinity_wait,
        max_queue=config.max_queue,
        disk_lookup=catalog.lookup,
        fim_slots=config.fim_slots,
        fork_pays=catalog.fork_pays,  # forks of HOT slots are carried out by the disk tier
        fair=config.queue_discipline == "fair",
        tenant_weights=dict(config.tenant_weights),
        tenant_max_in_flight=config.tenant_max_in_flight,
        tenant_max_queued=config.tenant_max_queued,
        fim_idle=config.fim_idle,
        side_call_wait=config.side_call_wait,
        isolate_tenants=config.isolate_tenants,
        keep_pays=catalog.keep_pays,  # and saves and restores on a request's path judged in time
        restore_beats=catalog.restore_beats,
    )
    monitor = Monitor(
        reactor, scheduler, backends, config.health_interval, config.slots,
        # tier and gate: built below
        on_up=lambda backend, described: tier.backend_up(backend.name, described.model, described.process),
        on_lost=lambda name: tier.identity_lost(name),
        on_change=lambda: gate.changed(),
    )
    gate = ReadyGate(
        reactor, scheduler, config.queue_timeout,
        look=monitor.look_now, usable=monitor.usable, some_down=monitor.some_down,
    )
    stats = Stats(
        reactor, scheduler, catalog, monitor,
        max_cache_bytes=config.max_cache_bytes or 0, max_cache_entries=config.max_cache_entries,
        waiting_for_backend=lambda: gate.held,
    )
    tier = DiskTier(
        config, reactor, scheduler, by_name, catalog, on_empty_slot=monitor.check, observers=[stats.slot_action]
    )
    dispatcher = Dispatcher(
        reactor, scheduler, by_name, tier,
        first_byte_timeout=config.first_byte_timeout,
        observers=[stats.request_done],
        on_stale=lambda slot_id: monitor.check(),
        on_unreachable=monitor.take_out,
        on_own_cache=monitor.noticed_ram_cache,
        gate=gate,
        isolate_tenants=config.isolate_tenants,
    )
    fleet = Fleet(
        by_name, scheduler, monitor,
        connect=connect,
        on_added=lambda name, save_dir: _note_storage(catalog, name, save_dir or config.slot_save_path),
        save_hot_slots=lambda name: tier.flush(backend=name),
    )
    proxy = Proxy(
        config, reactor, dispatcher, by_name,
        status=stats.status, metrics=stats.metrics_text,
        health=lambda: own_health(config, monitor, scheduler, tier),
        context_limit=monitor.slot_context,
        healthy_backend=monitor.healthy,
        admin=Admin(fleet, config.admin_keys),
        body_reader=BodyReader(to_thread),
    )
    return Wired(catalog, scheduler, monitor, gate, stats, tier, dispatcher, fleet, proxy)


def _note_storage(catalog: Catalog, backend: str, save_dir: str | None) -> None:
    if save_dir:
        catalog.storage[backend] = os.path.realpath(save_dir)


def own_health(config: Config, monitor: Monitor, scheduler: Scheduler, tier: DiskTier) -> tuple[bool, dict[str, Any]]:
    """The proxy's own state, apart from llama.cpp's /health; C{backend_warnings} does not make it fail."""
    meta_dir = Path(config.meta_dir)
    checks = {
        "upstream_reachable": monitor.ready,
        "slots_known": bool(scheduler.slots),
        "index_loaded": tier.loaded.called,
        "disk_writable": os.access(meta_dir if meta_dir.exists() else meta_dir.parent, os.W_OK),
    }
    # Informational: a backend without slot saves (say) still serves.
    warnings = {h.backend.url: list(h.warnings) for h in monitor.health.values() if h.warnings}
    return all(checks.values()), {**checks, "backend_warnings": warnings}


def _start_embedded(config: Config, parent: MultiService) -> Config:
    import secrets

    import attrs

    from proxycache.embedded import EmbeddedLlamaService, LlamaServerSpec, free_port

    model = config.llama_model
    if model is None:
        from proxycache.tinymodel import ensure_model

        cache = Path(config.meta_dir).parent / "models"
        model = str(ensure_model(cache))
    slots = config.slots or 4
    port = free_port()
    save_dir = config.slot_save_path or str(Path(config.meta_dir).parent / "slot-saves")
    api_key = secrets.token_urlsafe(32)  # no other local user may drive our llama.cpp
    spec = LlamaServerSpec(
        model=model, slots=slots, ctx_per_slot=config.ctx_per_slot, save_dir=save_dir, port=port,
        api_key=api_key, cache_ram_mib=0,
    )
    EmbeddedLlamaService(spec).setServiceParent(parent)
    return attrs.evolve(
        config, llama_url=(f"http://127.0.0.1:{port}",), slots=slots, slot_save_path=save_dir,
        upstream_api_key=api_key,
    )
