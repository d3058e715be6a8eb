"""
Run-time membership of the backends, for operators: C{/proxycache/backends}.

  GET    /proxycache/backends                  every backend: url, up, slots, busy, draining
  POST   /proxycache/backends        {"url", "save_dir"?, "api_key"?}  add one (it takes requests once it
                                               answers; save_dir: its save directory as this host sees it;
                                               api_key: its --api-key, none sent without one)
  POST   /proxycache/backends/drain  {"url"}   no new requests there; answers once in-flight ones
                                               finished and its hot slots were saved
  DELETE /proxycache/backends        {"url"}   drain, then forget it

Only with C{--admin-keys}, and only for those keys: a client key cannot change the fleet.
"""

from __future__ import annotations

import json
from typing import Any
from twisted.web.iweb import IRequest

from proxycache.config import backend_url
from proxycache.slots import Fleet
from proxycache.web._auth import authorize
from proxycache.web._errors import ApiError, bad_request
from proxycache.web._validate import parse_json_object


class Admin:
    def __init__(self, fleet: Fleet, admin_keys: tuple[str, ...]) -> None:
        self.fleet = fleet
        self.admin_keys = admin_keys

    def _authorize(self, request: IRequest) -> None:
        if not self.admin_keys:
            raise ApiError(403, "run-time backend changes need --admin-keys (or reload the config with SIGHUP)",
                           "invalid_request_error", "admin_disabled")
        authorize(request, self.admin_keys)

    def _body(self, request: IRequest) -> dict[str, Any]:
        return parse_json_object(request.content.read())

    def _url(self, body: dict[str, Any]) -> str:
        url = body.get("url")
        if not isinstance(url, str):
            raise bad_request("'url' must be a backend's http(s) base URL")
        try:
            return backend_url(url)
        except ValueError as e:
            raise bad_request(f"'url': {e}") from None

    def _named(self, url: str) -> str:
        for name, backend in self.fleet.backends.items():
            if backend.url == url:
                return name
        raise ApiError(404, f"no backend {url}", "invalid_request_error", "unknown_backend")

    def _listing(self, request: IRequest) -> bytes:
        scheduler, monitor = self.fleet.scheduler, self.fleet.monitor
        backends = []
        for name, backend in self.fleet.backends.items():
            slots = [s for s in scheduler.slots.values() if s.id.backend == name]
            health = monitor.health.get(name)
            backends.append({
                "url": backend.url, "up": bool(health and health.up), "slots": len(slots),
                "busy": sum(1 for s in slots if s.busy), "draining": name in scheduler.closed,
                "duplicate_of": health.duplicate_of if health else None,
            })
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"backends": backends}).encode()

    def list_backends(self, request: IRequest) -> bytes:
        self._authorize(request)
        return self._listing(request)

    def add(self, request: IRequest) -> bytes:
        self._authorize(request)
        body = self._body(request)
        save_dir = body.get("save_dir")
        if save_dir is not None and not isinstance(save_dir, str):
            raise bad_request("'save_dir' must be the backend's --slot-save-path as this host sees it")
        api_key = body.get("api_key")
        if api_key is not None and not (isinstance(api_key, str) and api_key):
            raise bad_request("'api_key' must be the key the backend was started with (--api-key), or absent")
        self.fleet.add(self._url(body), save_dir, api_key)
        return self._listing(request)

    async def drain(self, request: IRequest) -> bytes:
        self._authorize(request)
        await self.fleet.drain(self._named(self._url(self._body(request))))
        return self._listing(request)

    async def remove(self, request: IRequest) -> bytes:
        self._authorize(request)
        await self.fleet.remove(self._named(self._url(self._body(request))))
        return self._listing(request)
