"""This node's address: the one its workers bind and advertise, and the store listens on.

Choice, in order: an address given by the user (``--local-addr``); else the address of
the interface that routes to a peer everyone must reach (the rendezvous endpoint or the
store), found with a UDP ``connect()`` that sends nothing; else the host's FQDN. Host
names are not trusted by default because inside containers and network namespaces they
often resolve to ``localhost`` (or to the same name on every "machine").

Torch-free and standard library only: the launcher and the workers both use it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address


def split_endpoint(endpoint: str, default_port: int = 0) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``"host"`` -> (host, port)."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if endpoint.count(":") == 1:
        host, _, port = endpoint.partition(":")
        return host, int(port) if port else default_port
    return endpoint, default_port  # a bare host name or IPv6 literal


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _first_udp(host: str, port: int, act: Callable[[socket.socket, tuple], object]
               ) -> str | None:
    """Try `act(sock, sockaddr)` on a UDP socket for each address of ``host`` until one
    does not raise OSError; that socket's local address, or None."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                act(s, sockaddr)
            except OSError:
                continue
            return s.getsockname()[0]
    return None


def route_addr(peer: str, port: int = 9) -> str | None:
    """The local address of the interface that routes to ``peer`` (None if none does).

    ``connect()`` on a UDP socket only picks the route and the source address; no packet
    is sent.
    """
    return _first_udp(peer, port or 9, lambda s, addr: s.connect(addr))


def node_address(local_addr: str | None, peer: str | None) -> str:
    """This node's address: ``local_addr``, else the route to ``peer``, else the FQDN."""
    if local_addr:
        return local_addr
    if peer:
        addr = route_addr(peer)
        if addr is not None:
            return addr
    return socket.getfqdn()


def is_local_address(host: str) -> bool:
    """True if ``host`` (a name or IP literal) is an address of one of our interfaces.

    Binding a socket to an address succeeds only for a local one, which holds inside
    network namespaces and containers too, where host-name checks go wrong.
    """
    return _first_udp(host, 0, lambda s, addr: s.bind(addr)) is not None


def port_is_free(host: str, port: int) -> bool:
    """True if a TCP server could listen on ``host:port`` right now."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore binds
        try:
            s.bind(sockaddr)
        except OSError:
            return False
    return True


def interface_of(addr: str) -> str | None:
    """Name of the interface that holds ``addr`` (IPv4 primary or IPv6), else None."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return None
    if ip.version == 6:
        return _ipv6_interface(ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                  struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == str(ip):
                return name
    return None


def _ipv6_interface(ip: ipaddress.IPv6Address) -> str | None:
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and ipaddress.IPv6Address(int(parts[0], 16)) == ip:
            return parts[5]
    return None
