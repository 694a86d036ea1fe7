"""RedisBroker on a real 3-shard Redis Cluster: fan-out, replay and reset
across two demo processes, with channels spread over the shards."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import pytest
from redis import asyncio as aioredis
from redis_server import RedisCluster
from support import DemoProcess

from sse_handler import BrokerUnavailableError, ServerSentEvent
from sse_handler.brokers.redis import RedisBroker, by_prefix
from sse_handler.testing import EventStreamClient

#: Channel groups (the name up to ":") whose keys sit on three different shards.
GROUPS = ("room0", "room1", "room2")


def _move_slot(cluster: RedisCluster, key: str, to: int) -> None:
    """Give ``key``'s slot (holding no keys) to node ``to``, on every node."""
    import redis

    clients = [redis.Redis(port=node.port) for node in cluster.nodes]
    try:
        target = clients[to].execute_command("CLUSTER", "MYID").decode()
        slot = clients[to].execute_command("CLUSTER", "KEYSLOT", key)
        for client in clients:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
    finally:
        for client in clients:
            client.close()


def test_the_groups_sit_on_three_shards(redis_cluster: RedisCluster) -> None:
    broker_keys = {g: f"sse:{{{g}}}s:" for g in GROUPS}
    assert sorted(redis_cluster.node_of(k) for k in broker_keys.values()) == [0, 1, 2]


def test_a_cluster_needs_one_slot_per_sequence() -> None:
    with pytest.raises(ValueError, match="hash tag"):
        RedisBroker("redis://127.0.0.1:1", cluster=True)
    with pytest.raises(ValueError, match="must not hold one"):
        RedisBroker("redis://127.0.0.1:1", prefix="sse:{a}:", shard_by=by_prefix())


async def _publish(demo: DemoProcess, channel: str, data: str) -> str:
    status, body = await demo.publish(data, channel=channel)
    assert status == 200, body
    event_id: str = body["id"]
    return event_id


@pytest.mark.timeout(90)
async def test_fan_out_replay_and_reset_across_two_processes(
    redis_cluster: RedisCluster,
) -> None:
    one = DemoProcess("--redis", redis_cluster.url, "--redis-cluster")
    two = DemoProcess("--redis", redis_cluster.url, "--redis-cluster")
    await asyncio.gather(one.start(), two.start())
    try:
        # One client per shard on process two, and one reading two channels
        # of one group (one hash tag: one sequence, exact order).
        clients = {}
        for group in GROUPS:
            clients[group] = await EventStreamClient.connect(
                f"{two.url}/events?channel={group}:chat"
            )
        pair = await EventStreamClient.connect(
            f"{two.url}/events?channel=room1:chat&channel=room1:news"
        )
        for client in [*clients.values(), pair]:
            assert (await client.next_event()).event == "welcome"
        # Fan-out: published through process one, delivered by process two.
        sent: dict[str, list[str]] = {g: [] for g in GROUPS}
        pair_sent: list[str] = []
        for i in range(20):
            for group in GROUPS:
                event_id = await _publish(one, f"{group}:chat", f"{group} {i}")
                sent[group].append(event_id)
                if group == "room1":
                    pair_sent.append(event_id)
            pair_sent.append(await _publish(one, "room1:news", f"news {i}"))
        for group, client in clients.items():
            events = await client.events(20, timeout=15)
            assert [e.data for e in events] == [f"{group} {i}" for i in range(20)]
            assert [e.id for e in events] == sent[group]
        pair_events = await pair.events(40, timeout=15)
        assert [e.id for e in pair_events] == pair_sent
        positions = [tuple(int(p) for p in (e.id or "").split("-")) for e in pair_events]
        assert all(a < b for a, b in itertools.pairwise(positions))
        # Replay on the other process, from the middle: exactly what followed.
        for group in GROUPS:
            resumed = await EventStreamClient.connect(
                f"{one.url}/events?channel={group}:chat", {"Last-Event-ID": sent[group][9]}
            )
            replayed = await resumed.events(10, timeout=15)
            assert [e.id for e in replayed] == sent[group][10:]
            assert (await resumed.next_event(timeout=15)).event == "welcome"
            resumed.close()
        resumed = await EventStreamClient.connect(
            f"{one.url}/events?channel=room1:chat&channel=room1:news",
            {"Last-Event-ID": pair_sent[24]},
        )
        assert [e.id for e in await resumed.events(15, timeout=15)] == pair_sent[25:]
        resumed.close()
        # A cursor this history never gave: a reset, on every shard.
        for group in GROUPS:
            ms = int(sent[group][-1].split("-")[0])
            future = await EventStreamClient.connect(
                f"{one.url}/events?channel={group}:chat", {"Last-Event-ID": f"{ms + 60_000}-0"}
            )
            reset = await future.next_event(timeout=15)
            assert (reset.event, json.loads(reset.data)) == ("reset", {"reason": "unknown_id"})
            future.close()
        for client in [*clients.values(), pair]:
            client.close()
    finally:
        codes = await asyncio.gather(one.stop(), two.stop())
    assert codes == [0, 0]


async def test_a_reset_when_a_shard_lost_its_history(redis_cluster: RedisCluster) -> None:
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix(), block=0.3)
    try:
        first = await broker.publish("room2:chat", ServerSentEvent(data="1"))
        kept = await broker.publish("room0:chat", ServerSentEvent(data="2"))
        # The shard of room2 loses everything (as a restart without persistence).
        import redis

        node = redis_cluster.nodes[redis_cluster.node_of("sse:{room2}s:")]
        with redis.Redis(port=node.port) as raw:
            raw.flushall()
        await broker.publish("room2:chat", ServerSentEvent(data="3"))
        assert (await broker.replay(["room2:chat"], first)).reset == "history_exceeded"
        # The other shards are untouched.
        after = await broker.publish("room0:chat", ServerSentEvent(data="4"))
        replay = await broker.replay(["room0:chat"], kept)
        assert (replay.reset, [d.id for d in replay.deliveries]) == (None, [after])
    finally:
        await broker.close()


async def _publish_after(broker: RedisBroker, channel: str, earlier: str) -> str:
    """Publish to ``channel`` until its id sorts after ``earlier`` (the groups'
    sequences share the machine's clock: a later millisecond is a later id)."""
    for attempt in range(100):
        event_id = await broker.publish(channel, ServerSentEvent(data=f"after {attempt}"))
        if wire_position(event_id) > wire_position(earlier):
            return event_id
        await asyncio.sleep(0.002)
    raise AssertionError(f"no id of {channel} after {earlier}")


def wire_position(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def test_a_client_of_two_groups_resumes_from_the_newer_group_without_a_reset(
    redis_cluster: RedisCluster,
) -> None:
    """A cursor from one group is not "from the future" for a group that
    published last before it, nor unknown to a group that never published."""
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix(), block=0.3)
    try:
        older = await broker.publish("room0:chat", ServerSentEvent(data="older"))
        newer = await _publish_after(broker, "room1:chat", older)
        # The client read both; its last event is the newer group's.
        replay = await broker.replay(["room0:chat", "room1:chat"], newer)
        assert (replay.reset, replay.deliveries) == (None, [])
        # With a channel of a group (shard) that never published too.
        replay = await broker.replay(["room0:chat", "room1:chat", "room2:quiet"], newer)
        assert (replay.reset, replay.deliveries) == (None, [])
        # What either group publishes next is replayed, in id order.
        missed = [
            await _publish_after(broker, "room0:chat", newer),
            await broker.publish("room1:chat", ServerSentEvent(data="next")),
        ]
        replay = await broker.replay(["room0:chat", "room1:chat"], newer)
        assert replay.reset is None
        assert sorted(d.id for d in replay.deliveries) == sorted(missed)
        assert [d.position for d in replay.deliveries] == sorted(
            d.position for d in replay.deliveries
        )
        # A group whose history began after the cursor: new, or its shard lost
        # its data meanwhile, which Redis cannot tell apart: a reset.
        fresh = f"fresh{uuid.uuid4().hex}:chat"
        await _publish_after(broker, fresh, newer)
        replay = await broker.replay(["room0:chat", fresh], newer)
        assert replay.reset == "history_exceeded"
        # A cursor after every group's newest is still from the future.
        future = f"{wire_position(missed[-1])[0] + 60_000}-0"
        replay = await broker.replay(["room0:chat", "room1:chat"], future)
        assert replay.reset == "unknown_id"
    finally:
        await broker.close()


@pytest.mark.timeout(60)
async def test_a_publish_that_timed_out_on_a_paused_shard_is_never_sent_again(
    redis_cluster: RedisCluster,
) -> None:
    broker = RedisBroker(
        redis_cluster.url, cluster=True, shard_by=by_prefix(), timeout=0.5, max_backoff=0.2
    )
    node = redis_cluster.nodes[redis_cluster.node_of("sse:{room2}s:")]
    raw = aioredis.Redis(port=node.port)
    try:
        await broker.publish("room2:chat", ServerSentEvent(data="before"))
        loop = asyncio.get_running_loop()
        node.pause()  # SIGSTOP: the connections stay up, nothing answers
        try:
            start = loop.time()
            publishing = asyncio.ensure_future(
                broker.publish("room2:chat", ServerSentEvent(data="once"))
            )
            # A pause a little longer than the timeout: the command is out,
            # its answer late; the shard runs it once it resumes.
            await asyncio.sleep(0.8)
        finally:
            node.resume()
        try:
            await publishing
        except BrokerUnavailableError as failed:
            # A timeout cannot tell whether the shard will still run it.
            assert failed.published is None
            assert loop.time() - start < 3.0  # bounded by the command timeout
        deadline = loop.time() + 15
        while True:
            try:
                await broker.publish("room2:chat", ServerSentEvent(data="after"))
                break
            except BrokerUnavailableError:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
        stored = [e[1][b"b"] for e in await raw.xrange(broker.stream_key("room2:chat"))]
        # It may have run, but only once: sent again, it would reach every
        # subscriber twice, under two ids.
        assert stored == [b"data: before\n\n", b"data: once\n\n", b"data: after\n\n"]
    finally:
        await raw.aclose()
        await broker.close()


@pytest.mark.timeout(90)
async def test_publishes_succeed_once_a_restarted_shard_answers(
    redis_cluster: RedisCluster,
) -> None:
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix(), max_backoff=0.2)
    node = redis_cluster.nodes[redis_cluster.node_of("sse:{room2}s:")]
    try:
        # Connections to the shard about to restart, many of them.
        await asyncio.gather(
            *(broker.publish("room2:chat", ServerSentEvent(data="warm")) for _ in range(60))
        )
        node.kill()
        # A publish while the shard is down fails, clearly.
        with pytest.raises(BrokerUnavailableError):
            await broker.publish("room2:chat", ServerSentEvent(data="down"))
        node.start()  # its cluster config kept: it comes back with its slots, empty
        raw = aioredis.Redis(port=node.port)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while b"cluster_state:ok" not in await raw.execute_command("CLUSTER", "INFO"):
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
        finally:
            await raw.aclose()
        # Connections the old server closed are replaced before use: no
        # publish fails for them, and none is sent twice.
        results = await asyncio.gather(
            *(broker.publish("room2:chat", ServerSentEvent(data=str(i))) for i in range(60)),
            return_exceptions=True,
        )
        failed = [r for r in results if not isinstance(r, str)]
        assert not failed, f"{len(failed)} of 60 failed, e.g. {failed[0]!r}"
        replay = await broker.replay(["room2:chat"], "0-0")
        data = sorted(int(d.frame.split(b"data: ")[1]) for d in replay.deliveries)
        assert data == list(range(60))
    finally:
        await broker.close()


async def test_racing_publishes_leave_in_batches_per_shard_in_the_order_of_the_calls(
    redis_cluster: RedisCluster,
) -> None:
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix())
    raws = [aioredis.Redis(port=node.port) for node in redis_cluster.nodes]

    async def connections() -> list[int]:
        return [(await raw.info("stats"))["total_connections_received"] for raw in raws]

    try:
        for group in GROUPS:  # a first connection to each shard
            await broker.publish(f"{group}:warm", ServerSentEvent(data="warm"))
        before = await connections()
        ids = await asyncio.gather(
            *(
                broker.publish(f"{GROUPS[i % 3]}:c{i % 7}", ServerSentEvent(data=str(i)))
                for i in range(300)
            )
        )
        # One connection per shard carried its hundred: they left in batches.
        assert await connections() == before
        for g, group in enumerate(GROUPS):
            positions = [wire_position(ids[i]) for i in range(g, 300, 3)]
            assert positions == sorted(positions) and len(set(positions)) == 100
            replay = await broker.replay([f"{group}:c{k}" for k in range(7)], "0-0")
            assert sorted(int(d.frame.split(b"data: ")[1]) for d in replay.deliveries) == list(
                range(g, 300, 3)
            )
    finally:
        for raw in raws:
            await raw.aclose()
        await broker.close()


async def test_a_publish_whose_slot_moved_is_stored_on_its_new_shard(
    redis_cluster: RedisCluster,
) -> None:
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix())
    # "room3" has no keys yet: its slot moves with a CLUSTER SETSLOT alone.
    key = "sse:{room3}s:"
    old = redis_cluster.node_of(key)
    new = (old + 1) % 3
    try:
        # The broker knows the old layout, and publishes to the old shard.
        await broker.publish(f"{GROUPS[old]}:x", ServerSentEvent(data="warm"))
        _move_slot(redis_cluster, key, new)
        # Sent to the old shard, answered MOVED, routed again: stored once,
        # on the new shard.
        first = await broker.publish("room3:x", ServerSentEvent(data="moved"))
        second = await broker.publish("room3:x", ServerSentEvent(data="after"))
        raw = aioredis.Redis(port=redis_cluster.nodes[new].port)
        try:
            entries = await raw.xrange(broker.stream_key("room3:x"))
        finally:
            await raw.aclose()
        assert [e[0].decode() for e in entries] == [first, second]
    finally:
        await broker.close()


async def test_a_burst_of_publishes_whose_slot_moved_waits_for_connections_and_all_succeed(
    redis_cluster: RedisCluster,
) -> None:
    # Every call of the old shard's batch answers MOVED and is routed again,
    # all at once: more than the node's max_connections.
    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix(), max_connections=8)
    key = "sse:{room4}s:"
    old = redis_cluster.node_of(key)
    new = (old + 1) % 3
    try:
        await broker.publish(f"{GROUPS[old]}:x", ServerSentEvent(data="warm"))
        _move_slot(redis_cluster, key, new)
        results = await asyncio.gather(
            *(broker.publish("room4:x", ServerSentEvent(data=str(i))) for i in range(60)),
            return_exceptions=True,
        )
        failed = [r for r in results if not isinstance(r, str)]
        assert not failed, f"{len(failed)} of 60 failed, e.g. {failed[0]!r}"
        raw = aioredis.Redis(port=redis_cluster.nodes[new].port)
        try:
            entries = await raw.xrange(broker.stream_key("room4:x"))
        finally:
            await raw.aclose()
        stored = sorted(int(fields[b"b"].split(b"data: ")[1]) for _, fields in entries)
        assert stored == list(range(60))  # each once
    finally:
        await broker.close()


async def test_close_leaves_no_connection_to_a_node_that_left_the_layout(
    redis_cluster: RedisCluster,
) -> None:
    import redis

    broker = RedisBroker(redis_cluster.url, cluster=True, shard_by=by_prefix())
    gone = redis_cluster.node_of("sse:{room1}s:")
    heir = redis_cluster.node_of("sse:{room0}s:")
    raw = aioredis.Redis(port=redis_cluster.nodes[gone].port)
    try:
        await broker.publish("room0:x", ServerSentEvent(data="warm"))
        # One publish out on the node about to leave (held by the pause, so
        # that it holds no key when its slots move) and one queued behind it.
        await raw.execute_command("CLIENT", "PAUSE", 800, "WRITE")
        first = asyncio.ensure_future(broker.publish("room1:x", ServerSentEvent(data="a")))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(broker.publish("room1:x", ServerSentEvent(data="b")))
        await asyncio.sleep(0.01)
        # Every slot of that node goes to another: it leaves the layout.
        clients = [redis.Redis(port=node.port) for node in redis_cluster.nodes]
        try:
            target = clients[heir].execute_command("CLUSTER", "MYID").decode()
            count = len(redis_cluster.nodes)
            slots = range(16384 * gone // count, 16384 * (gone + 1) // count)
            other = 3 - heir - gone
            # The heir first; then the node that loses them (a primary left
            # with no slot may turn into a replica of its heir at once).
            for client in (clients[heir], clients[gone], clients[other]):
                pipe = client.pipeline(transaction=False)
                for slot in slots:
                    pipe.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
                # The one that loses them may have learned it already, and
                # turned into a replica ("use SETSLOT only with masters").
                pipe.execute(raise_on_error=False)
            clients[heir].execute_command("CLUSTER", "BUMPEPOCH")
            port = redis_cluster.nodes[gone].port
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while any(
                r[2][1] == port
                for client in (clients[heir], clients[other])
                for r in client.execute_command("CLUSTER", "SLOTS")
            ):
                assert loop.time() < deadline, "the slots did not move"
                await asyncio.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        # redis-py's re-read of the layout, run directly: its own triggers
        # (every fifth MOVED, a connection error) do not come on cue.
        await broker._publish_redis.nodes_manager.initialize()
        # Stored (redis-py 6 and later), or cut by redis-py 5's re-read,
        # which disconnects every node: "may have run".
        for outcome in await asyncio.gather(first, second, return_exceptions=True):
            assert isinstance(outcome, str | BrokerUnavailableError), outcome
        await broker.close()
        # Nothing of the broker is left connected to that node's server.
        own = await raw.execute_command("CLIENT", "ID")
        deadline = loop.time() + 5
        while True:
            listing = (await raw.execute_command("CLIENT", "LIST")).decode().splitlines()
            others = [line for line in listing if not line.startswith(f"id={own} ")]
            if not others or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert not others, others
    finally:
        await raw.aclose()
        await broker.close()
