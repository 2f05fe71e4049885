"""The failed-key throttle: a client address that keeps presenting bad keys is refused for a while.

Owns: which client a request is judged as, counting its refused keys per window, and the blocks.
Must not: parse keys, look anything up or build responses (``gateway.handler`` asks it, before
authentication whether a client is blocked and after it whether a refusal counts).

Why: the key checksum is public, so anyone can mint well-formed random keys, and each new one
costs a Redis or store lookup. After ``failures`` refused keys (``invalid``/``expired``: the handler
decides what counts) within ``window`` seconds, a client is blocked for ``block`` seconds: its
keyed requests get 429 before any lookup.

Who a client is: the TCP peer, unless the peer is one of ``proxy.trusted_proxies``; then it is the
last hop of ``X-Forwarded-For`` that is not a trusted proxy (walking the chain from the right: each
trusted proxy appended the peer it saw, so everything left of the first untrusted hop was written by
the client and could be forged). IPv4 addresses are judged one by one, IPv6 by their
``ipv6_prefix`` network (/64 by default: one host usually holds a whole /64 and could rotate
through it), IPv4-mapped IPv6 as the IPv4 address.

Cost: a request whose key passes costs nothing here unless some client is blocked (the handler
tests ``blocked`` for emptiness first); then one memo lookup of the peer string (and, from a
trusted proxy, one of its X-Forwarded-For value) and one ``get`` on the blocked table. Counting a
refusal is O(1). Ended blocks and windows are dropped from the front of their tables (blocks by
the next keyed request, windows by the next refusal), so once blocks end the emptiness test is
all a request pays again.

Bounded memory: the counting table, the blocked table and the two memos each hold at most
``max_clients`` entries (the chain memo only values of up to 160 characters). When the counting
table is full, the client whose window started first is forgotten (``forgotten`` counts those
whose window was still open): an attacker spreading over more addresses than that can make its
counts be forgotten, so its addresses get up to ``failures`` tries each per cycle through the
table, while memory stays bounded and nobody is blocked who did not fail ``failures`` times. When
the blocked table is full, the block closest to its end is lifted early. An entry costs about
400 bytes with its memo entry.

Concurrency: the count is taken when a refusal is answered, so a client with many lookups in
flight at once can get up to that many more refusals past ``failures`` before its block starts.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDictProxy

from gateway.clock import SYSTEM, Clock
from gateway.config import ThrottleConfig

# An X-Forwarded-For hop that is no address is judged by its text, cut to this length.
_HOP_MAX: Final = 64
# X-Forwarded-For values up to this length are memoised (a few hops).
_CHAIN_MEMO_MAX: Final = 160
_UNSEEN: Final = "\x00unseen"  # no peer string contains NUL


class FailureThrottle:
    def __init__(
        self, cfg: ThrottleConfig, trusted_proxies: Iterable[str] = (), clock: Clock = SYSTEM
    ) -> None:
        self.clock = clock  # windows and blocks run on its monotonic time
        # client -> [window start, refusals in it], the earliest window first
        self._counting: OrderedDict[str, list[float]] = OrderedDict()
        # client -> end of its block, the earliest end first (every block lasts ``block`` seconds).
        # Never rebound: the handler keeps a reference to test it for emptiness.
        self.blocked: OrderedDict[str, float] = OrderedDict()
        # peer string -> the client it is judged as, or None for a trusted proxy
        self._peers: dict[str, str | None] = {}
        # X-Forwarded-For value a trusted proxy sent -> the client it names
        self._chains: dict[str, str] = {}
        self.refused = 0  # requests answered 429
        self.blocks = 0  # times a client was blocked
        self.forgotten = 0  # counting entries dropped at the bound while their window was open
        self.configure(cfg, trusted_proxies)

    @property
    def clock(self) -> Clock:
        return self._clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        """Windows and blocks under way carry on in the new clock's time (tests move it)."""
        self._clock = clock
        self._now = clock.monotonic

    def configure(self, cfg: ThrottleConfig, trusted_proxies: Iterable[str]) -> None:
        """Apply a (reloaded) config; counts and blocks in progress are kept."""
        self.failures = cfg.failures
        self.window = cfg.window
        self.block = cfg.block
        self.max_clients = cfg.max_clients
        self._v6_shift = 128 - cfg.ipv6_prefix
        self._v6_suffix = f"/{cfg.ipv6_prefix}"
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self._peers.clear()
        self._chains.clear()
        if not self.failures:
            self._counting.clear()
            self.blocked.clear()

    # -- who the client is ------------------------------------------------------------------

    def client(self, peer: str | None, headers: CIMultiDictProxy[str]) -> str:
        """The client a request is judged as (an address, or an IPv6 network)."""
        peer = peer or ""
        peers = self._peers
        judged = peers.get(peer, _UNSEEN)
        if judged is _UNSEEN:
            addr = _address(peer)
            trusted = addr is not None and any(addr in net for net in self._trusted)
            judged = None if trusted else self._judged(addr, peer)
            if len(peers) >= self.max_clients:
                peers.clear()  # amortised O(1): one clear per max_clients new peers
            peers[peer] = judged
        if judged is not None:
            return judged
        chain = ",".join(headers.getall("X-Forwarded-For", []))
        chains = self._chains
        judged = chains.get(chain)
        if judged is None:
            judged = self._forwarded_client(peer, chain)
            if len(chains) >= self.max_clients:
                chains.clear()
            # An empty chain names the proxy itself: not memoised, as proxies differ. A long one
            # (written by the client, mostly) is not kept either: it would cost memory.
            if 0 < len(chain) <= _CHAIN_MEMO_MAX:
                chains[chain] = judged
        return judged

    def _forwarded_client(self, peer: str, chain: str) -> str:
        hops = [h.strip() for h in chain.split(",")]
        first = peer
        for hop in reversed(hops):
            if not hop:
                continue
            addr = _address(hop)
            if addr is None or not any(addr in net for net in self._trusted):
                return self._judged(addr, hop)
            first = hop
        return self._judged(_address(first), first)  # every hop is a trusted proxy

    def _judged(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, text: str) -> str:
        if addr is None:
            return text[:_HOP_MAX]
        if isinstance(addr, ipaddress.IPv6Address):
            mapped = addr.ipv4_mapped
            if mapped is not None:
                return str(mapped)
            shift = self._v6_shift
            net = ipaddress.IPv6Address(int(addr) >> shift << shift)
            return f"{net}{self._v6_suffix}"
        return str(addr)

    # -- blocks -----------------------------------------------------------------------------

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (at least 1), or 0 when it is not blocked. A
        positive answer counts as a refused request."""
        now = self._now()
        blocked = self.blocked
        while blocked:  # drop ended blocks from the front (all last the same time)
            first_end = next(iter(blocked.values()))
            if first_end > now:
                break
            blocked.popitem(last=False)
        until = blocked.get(client)
        if until is None:
            return 0
        self.refused += 1
        return max(1, math.ceil(until - now))

    def failed(self, client: str) -> None:
        """``client`` presented a key that was refused; block it at the ``failures``-th refusal
        within a window."""
        if not self.failures or client in self.blocked:
            return  # off, or a lookup that started before the block
        now = self._now()
        counting = self._counting
        while counting:  # drop ended windows from the front
            first = next(iter(counting.values()))
            if first[0] + self.window > now:
                break
            counting.popitem(last=False)
        entry = counting.get(client)
        if entry is None:
            if len(counting) >= self.max_clients:
                counting.popitem(last=False)  # its window is still open (ended ones went above)
                self.forgotten += 1
            entry = counting[client] = [now, 0.0]
        entry[1] += 1
        if entry[1] < self.failures:
            return
        del counting[client]
        blocked = self.blocked
        if len(blocked) >= self.max_clients:
            blocked.popitem(last=False)
        blocked[client] = now + self.block
        self.blocks += 1

    @property
    def counting(self) -> int:
        return len(self._counting)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a peer string or an X-Forwarded-For hop (``[v6]:port`` and ``v4:port``
    forms included), or None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    else:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
