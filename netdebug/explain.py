"""Explaining a node's service decisions from its proxy's debug dump, one explainer per mode.

A proxy mode's explainer answers two questions from the dump (`corral proxy`'s
debug socket): the service table as the node programmed it (`table`), and what
the node does with one connection (`decide`: which rule or map entry, which
backend, and why). The iptables mode reads its nat chains and affinity ipsets,
the nftables mode its table's maps, chains and sets (`kernel.nftables`);
another mode (the eBPF proxy, whose dump holds its maps) registers its own
explainer in `EXPLAINERS` under its mode name, and `trace` and `services` use it
unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from corral.proxy import rules as R


@dataclass
class Affinity:
    client: str
    backend: str
    age: int | None  # seconds since the client last connected (timeout - left)
    left: int | None  # seconds before it is forgotten


@dataclass
class ServiceEntry:
    vip: str
    port: int
    protocol: str
    name: str  # the comment: ns/name[:port]
    backends: list[str]  # ip:port, in the rules' order
    rule: str  # where the node dispatches it (chain, or map entry)
    affinity_timeout: int | None = None
    affinity: list[Affinity] = field(default_factory=list)
    reject: bool = False  # no endpoints: connections are refused

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    found: bool  # the node has the VIP:port programmed at all
    backend: str | None  # ip:port when the node's state decides it (affinity), else None
    candidates: list[str]
    why: str
    rule: str = ""
    state: dict[str, Any] = field(default_factory=dict)


class ServiceExplainer(Protocol):
    mode: str

    def table(self, dump: dict[str, Any]) -> list[ServiceEntry]: ...

    def decide(
        self, dump: dict[str, Any], vip: str, port: int, protocol: str, client: str
    ) -> Decision: ...


def _word(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _comment(line: str) -> str:
    if "--comment" not in line:
        return ""
    rest = line.split("--comment", 1)[1].strip()
    if rest.startswith('"'):
        return rest[1:].split('"', 1)[0]
    return rest.split()[0]


class IptablesExplainer:
    mode = "iptables"

    def table(self, dump: dict[str, Any]) -> list[ServiceEntry]:
        kern = dump.get("kernel") or {}
        nat = (kern.get("nat") or {}).get("chains", {})
        filt = (kern.get("filter") or {}).get("chains", {})
        sets = kern.get("ipsets") or {}
        out: list[ServiceEntry] = []
        # portals: in the bucket chains CORRAL-SERVICES dispatches to (proxy/rules.py)
        portals = [
            line
            for chain in sorted(nat)
            if chain == R.SERVICES or chain.startswith(R.BUCKET_PREFIX)
            for line in nat[chain]
        ]
        for line in portals:
            w = line.split()
            target = _word(w, "-j") or ""
            dst, dport = _word(w, "-d"), _word(w, "--dport")
            if not target.startswith(R.SVC_PREFIX) or not dst or not dport:
                continue
            proto = (_word(w, "-p") or "tcp").upper()
            name = _comment(line).removesuffix(" cluster IP")
            e = ServiceEntry(dst.split("/")[0], int(dport), proto, name, [], f"nat {target}")
            seps: dict[str, str] = {}  # SEP chain -> backend
            timeouts: dict[str, int] = {}
            aff_sets: dict[str, str] = {}  # set -> SEP chain
            order = []
            for rule in nat.get(target, []):
                rw = rule.split()
                jump = _word(rw, "-j") or ""
                if not jump.startswith(R.SEP_PREFIX):
                    continue
                if "--match-set" in rw:
                    aff_sets[_word(rw, "--match-set") or ""] = jump
                elif jump not in order:
                    order.append(jump)
            for sep in order:
                for rule in nat.get(sep, []):
                    rw = rule.split()
                    if "--to-destination" in rw:
                        seps[sep] = _word(rw, "--to-destination") or "?"
                    if "--add-set" in rw and "--timeout" in rw:
                        timeouts[sep] = int(_word(rw, "--timeout") or 0)
            e.backends = [seps.get(s, f"? ({s})") for s in order]
            for s, sep in aff_sets.items():
                t = timeouts.get(sep)
                e.affinity_timeout = t
                for client, left in sorted((sets.get(s) or {}).get("entries", {}).items()):
                    age = t - left if t is not None and left is not None else None
                    e.affinity.append(Affinity(client, seps.get(sep, "?"), age, left))
            out.append(e)
        for line in filt.get(R.SERVICES, []):
            w = line.split()
            if _word(w, "-j") != "REJECT" or not _word(w, "-d"):
                continue
            name = _comment(line).removesuffix(" has no endpoints")
            out.append(
                ServiceEntry(
                    (_word(w, "-d") or "").split("/")[0],
                    int(_word(w, "--dport") or 0),
                    (_word(w, "-p") or "tcp").upper(),
                    name,
                    [],
                    "filter CORRAL-SERVICES REJECT",
                    reject=True,
                )
            )
        return out

    def decide(
        self, dump: dict[str, Any], vip: str, port: int, protocol: str, client: str
    ) -> Decision:
        for e in self.table(dump):
            if (e.vip, e.port, e.protocol) != (vip, port, protocol.upper()):
                continue
            if e.reject:
                return Decision(
                    True,
                    None,
                    [],
                    f"{e.name} has no endpoints: the node rejects the connection "
                    f"({'TCP reset' if protocol.upper() == 'TCP' else 'ICMP port unreachable'})",
                    e.rule,
                )
            hit = next((a for a in e.affinity if a.client == client), None)
            if hit is not None:
                return Decision(
                    True,
                    hit.backend,
                    e.backends,
                    f"ClientIP affinity hit: {client} last connected {hit.age}s ago "
                    f"(forgotten in {hit.left}s), so {hit.backend}",
                    e.rule,
                    {"affinity": asdict(hit), "timeout": e.affinity_timeout},
                )
            n = len(e.backends)
            why = (
                f"random: one of {n} endpoint(s), each 1/{n} (statistic cascade in {e.rule})"
                if n > 1
                else f"the only endpoint ({e.rule})"
            )
            if e.affinity_timeout:
                why += f"; affinity then keeps {client} there for {e.affinity_timeout}s"
            return Decision(True, e.backends[0] if n == 1 else None, e.backends, why, e.rule)
        return Decision(False, None, [], f"{vip}:{port}/{protocol} is not programmed on this node")


class UnknownExplainer:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def table(self, dump: dict[str, Any]) -> list[ServiceEntry]:
        return []

    def decide(
        self, dump: dict[str, Any], vip: str, port: int, protocol: str, client: str
    ) -> Decision:
        return Decision(
            False,
            None,
            [],
            f"the proxy runs mode {self.mode!r}, which corral net cannot explain yet",
        )


def _find(obj: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere in nft's JSON."""
    out: list[Any] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                out.append(v)
            out += _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            out += _find(v, key)
    return out


class NftablesExplainer:
    """The nftables mode's table (proxy/nftrules.py): the service-ips map, each service
    chain's cascade (DNAT, or goto an endpoint chain with affinity), the affinity sets
    and the no-endpoint-services map."""

    mode = "nftables"

    def table(self, dump: dict[str, Any]) -> list[ServiceEntry]:
        nft = (dump.get("kernel") or {}).get("nftables") or {}
        maps, chains, sets = nft.get("maps", {}), nft.get("chains", {}), nft.get("sets", {})
        out: list[ServiceEntry] = []

        def dnat(rule: Any) -> str | None:
            d = _find(rule, "dnat")
            return f"{d[0].get('addr')}:{d[0].get('port')}" if d else None

        def ep_backend(chain: str) -> tuple[str, int | None]:
            backend, timeout = "?", None
            for rule in chains.get(chain, []):
                backend = dnat(rule) or backend
                t = [x for x in _find(rule, "timeout") if isinstance(x, int)]
                timeout = t[0] if t else timeout
            return backend, timeout

        def name_of(chain: str) -> str:
            parts = chain.split("-", 2)[-1].split("/")
            return f"{parts[0]}/{parts[1]}:{parts[3]}" if len(parts) >= 4 else chain

        for key, verdict in sorted((maps.get("service-ips") or {}).items()):
            vip, proto, port = [x.strip() for x in key.split(" . ")]
            chain = verdict.split()[-1]
            e = ServiceEntry(vip, int(port), proto.upper(), name_of(chain), [],
                             f"map service-ips -> {chain}")  # fmt: skip
            aff: dict[str, str] = {}  # set -> backend
            for rule in chains.get(chain, []):
                gotos = [g.get("target") for g in _find(rule, "goto")]
                sets_used = [r for r in _find(rule, "right") if str(r).startswith("@")]
                if dnat(rule):
                    e.backends.append(dnat(rule) or "?")
                elif gotos and sets_used:
                    backend, e.affinity_timeout = ep_backend(gotos[0])
                    aff[str(sets_used[0])[1:]] = backend
                elif gotos:
                    e.backends.append(ep_backend(gotos[0])[0])
            for s, backend in aff.items():
                for client, left in sorted((sets.get(s) or {}).get("entries", {}).items()):
                    t = e.affinity_timeout
                    age = t - left if t is not None and isinstance(left, int) else None
                    e.affinity.append(Affinity(client, backend, age, left))
            out.append(e)
        for key, verdict in sorted((maps.get("no-endpoint-services") or {}).items()):
            vip, proto, port = [x.strip() for x in key.split(" . ")]
            target = str(verdict).split()[-1]  # reject-chain, or drop (endpoints elsewhere)
            out.append(ServiceEntry(vip, int(port), proto.upper(), "", [],
                                    f"map no-endpoint-services -> {target}",
                                    reject=target != "drop"))  # fmt: skip
        return out

    def decide(
        self, dump: dict[str, Any], vip: str, port: int, protocol: str, client: str
    ) -> Decision:
        d = IptablesExplainer.decide(self, dump, vip, port, protocol, client)  # type: ignore[arg-type]
        d.why = d.why.replace("statistic cascade", "numgen cascade")
        return d


EXPLAINERS: dict[str, ServiceExplainer] = {
    "iptables": IptablesExplainer(),
    "nftables": NftablesExplainer(),
}


def explainer(proxy_dump: dict[str, Any]) -> ServiceExplainer:
    comp = ((proxy_dump.get("components") or {}).get("proxy") or {}).get("debug") or {}
    mode = comp.get("mode") or "iptables"
    return EXPLAINERS.get(mode) or UnknownExplainer(mode)


def proxy_state(proxy_dump: dict[str, Any]) -> dict[str, Any]:
    """The proxy component's part of the dump (what explainers read)."""
    return ((proxy_dump.get("components") or {}).get("proxy") or {}).get("debug") or {}
