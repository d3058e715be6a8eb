"""
A TCP relay that keeps every byte a server answers: put it between the daemon
and llama.cpp, and a test sees exactly what llama.cpp sent, to compare with
what the client got through the proxy (and what the daemon sent it).
"""

from __future__ import annotations

import http.client
import io
import socket
import threading
from typing import Callable
from urllib.parse import urlsplit


class ReplyTap:
    """Forwards each connection made to C{url} to C{target_url}, keeping what the target answers."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._replies: list[bytearray] = []  # one per connection, as the target sent it
        self._sent: list[bytearray] = []  # one per connection, as the client sent it
        self._sockets: list[socket.socket] = []
        self._held: threading.Event | None = None
        self._cut = threading.Event()
        self._gate: tuple[bytes, threading.Event, threading.Event] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_requests(self, marker: bytes) -> tuple[threading.Event, threading.Event]:
        """
        From now on, hold what a client sends with C{marker} in it (e.g. C{b"action=save"}: a
        slot save) until the test has looked.  Returns (reached, opened): C{reached} is set when
        such a request is held; setting C{opened} (or L{close}) lets it and all later ones through.
        """
        reached, opened = threading.Event(), threading.Event()
        self._gate = (marker, reached, opened)
        return reached, opened

    def hold(self) -> threading.Event:
        """
        Stand in for a port that stays open while the server behind it restarts (a
        container's published port): from now on the first connection the target
        refuses gets the start of a reply, then is cut (a server killed while it
        answered); later ones wait for L{release}, then reach the target.
        Returns what is set once that first one was cut.
        """
        self._held = threading.Event()
        self._cut = threading.Event()
        return self._cut

    def release(self) -> None:
        if self._held is not None:
            self._held.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = self._connect(client)
        if upstream is None:
            return
        reply, sent = bytearray(), bytearray()
        self._replies.append(reply)
        self._sent.append(sent)
        self._sockets += [client, upstream]
        threading.Thread(target=_pump, args=(client, upstream, sent, self._hold), daemon=True).start()
        _pump(upstream, client, reply)

    def _hold(self, data: bytes) -> None:
        if self._gate is not None:
            marker, reached, opened = self._gate
            if marker in data and not opened.is_set():
                reached.set()
                opened.wait(120)

    def _connect(self, client: socket.socket) -> socket.socket | None:
        """The target for C{client}; None, C{client} closed, when the target refuses (see L{hold})."""
        try:
            return socket.create_connection(self._target)
        except OSError:
            pass
        held = self._held
        if held is not None and self._cut.is_set():
            held.wait()
            try:
                return socket.create_connection(self._target)
            except OSError:
                pass
        elif held is not None:
            client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[")
            self._cut.set()
        client.close()
        return None

    def bodies(self) -> list[bytes]:
        """The body of every HTTP response kept so far (transfer encoding undone), connection by connection."""
        return [body for reply in list(self._replies) for body in _responses(bytes(reply))]

    def sent(self) -> bytes:
        """Every byte the clients sent through the tap so far (requests, headers included)."""
        return b"".join(bytes(sent) for sent in list(self._sent))

    def close(self) -> None:
        self.release()
        if self._gate is not None:
            self._gate[2].set()
        for sock in [self._listener, *self._sockets]:
            sock.close()


def _pump(
    source: socket.socket, sink: socket.socket, kept: bytearray | None,
    before: Callable[[bytes], None] | None = None,
) -> None:
    try:
        while data := source.recv(65536):
            if kept is not None:
                kept.extend(data)  # before the peer has it: once the client has read it, so has the tap
            if before is not None:
                before(data)
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _Kept(io.BytesIO):
    def close(self) -> None:  # a response read to its end closes its file: the next one follows in it
        pass


class _Replay:
    """What C{http.client.HTTPResponse} reads a response from: bytes already received."""

    def __init__(self, data: bytes) -> None:
        self.file = _Kept(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


def _responses(data: bytes) -> list[bytes]:
    replay = _Replay(data)
    bodies = []
    while replay.file.tell() < len(data):
        response = http.client.HTTPResponse(replay)  # type: ignore[arg-type]
        try:
            response.begin()
            bodies.append(response.read())
        except http.client.HTTPException:  # still arriving
            break
    return bodies
