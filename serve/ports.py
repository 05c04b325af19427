"""The server's TCP ports, taken before anything starts: a port in use is one line and exit 1, naming
the flag that changes it, never a worker that cannot bind and is restarted in a loop.

Worker processes listen on the HTTP port (and worker 0 on the gRPC port) with SO_REUSEPORT, the kernel
spreading connections over the listening members. The parent reserves each port first:

1. `probe`: a plain socket (SO_REUSEADDR, not SO_REUSEPORT) is bound and listens for an instant. It
   fails when anything listens on the port: another program, or another `toolkit serve` (whose
   workers' SO_REUSEPORT sockets a probe without SO_REUSEPORT cannot join). Without this, a second
   server of the same user would silently join the first one's SO_REUSEPORT group and take half of
   its connections.
2. `listener(..., listen=False)`: the reservation, bound in the port's SO_REUSEPORT group and never
   listening (it gets no connections) for the server's whole life, so a restarted worker can always bind
   again, and the port number is known when 0 (any free port) was asked.
"""

from __future__ import annotations

import socket

from .errors import ServeStartupError


def listener(host: str, port: int, listen: bool, reuse_port: bool = True) -> socket.socket:
    """A TCP socket on (host, port), in the port's SO_REUSEPORT group unless `reuse_port` is False.

    proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and accepted
    sockets inherit the listening socket's proto (without it, Nagle adds ~40 ms per answer at c=1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _refused(what: str, host: str, port: int, exc: OSError, hint: str) -> ServeStartupError:
    reason = (exc.strerror or str(exc)).lower()
    return ServeStartupError(f"cannot listen {what}on {host}:{port}: {reason} ({hint})")


def probe(host: str, port: int, what: str, hint: str) -> None:
    """Raise ServeStartupError (naming `hint`, the flag that changes the port) when the port is in use."""
    if port == 0:
        return
    try:
        listener(host, port, listen=True, reuse_port=False).close()
    except OSError as exc:
        raise _refused(what, host, port, exc, hint) from None


def reserve(host: str, port: int, what: str, hint: str) -> socket.socket:
    """Probe the port, then hold it (bound in its SO_REUSEPORT group, not listening); port 0: any free one."""
    probe(host, port, what, hint)
    try:
        return listener(host, port, listen=False)
    except OSError as exc:
        raise _refused(what, host, port, exc, hint) from None


HTTP_HINT = "--port chooses another"
GRPC_HINT = "--grpc-port chooses another; --grpc-port 0 turns gRPC off"
GRPC = "for gRPC "
