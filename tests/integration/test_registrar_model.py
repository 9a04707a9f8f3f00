"""Model-based test of the registrar's scripts against a small reference model.

Agents publish register/heartbeat/drain/leave with (incarnation, seq), restart
with a new incarnation, and their events are delivered late, duplicated and
through either of two registrars' connections; HTTP-style writes use
``after_newest``; the reaper removes instances whose deadline is made due.
After every step the stored records and the revision must equal the model's,
and nothing older than a leave or a reap may bring an instance back.

Agent events carry ``since`` (the seq of the agent's last content change; some
agents send none) and each delivery is decided as the registrar's intake
decides it (``_touch.touchable``) against a view that lags (refreshed from Redis
only by a rule): a touch runs ``lua/touch.lua`` (an absent one then goes through
apply.lua). The model is unchanged: a touch must answer what applying the
event in full answers (``refreshed`` or ``stale``), and leave the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from saga_events import _touch, model, scripts
from saga_events.embedded import RedisServer
from saga_events.keys import Keys

K = Keys()
IDS = ("a", "b")
URLS = ("http://10.0.0.1:80", "http://10.0.0.2:80")
HTTP_INC = 9_000_000_000_000_000
Pair = tuple[int, int]


@dataclass
class Rec:
    pair: Pair
    url: str
    draining: bool


@dataclass
class State:
    record: Rec | None = None
    order: Pair | None = None
    tomb: Pair | None = None
    removed: Pair | None = None  # newest pair a leave or reap removed the record with


@dataclass
class Agent:
    inc: int
    seq: int = 0
    since: int = 0
    content: tuple[str, bool] | None = None  # None: the next announce (re)creates


@dataclass
class Model:
    states: dict[str, State] = field(default_factory=lambda: {i: State() for i in IDS})
    rev: int = 0

    def apply(self, ev: model.AnyEvent, after_newest: bool) -> str:
        st = self.states[ev.service_id]
        pair = (ev.incarnation, ev.seq)
        if st.tomb is not None and pair <= st.tomb:
            return "stale"
        newest = st.order or (st.record.pair if st.record else None)
        if after_newest and newest is not None:
            pair = (newest[0], newest[1] + 1)
        if isinstance(ev, model.Leave):
            if newest is not None and pair <= newest:
                return "stale"
            if st.record is None and st.order is None and st.tomb is None:
                st.tomb = pair  # the unknown leave's short-lived marker
                return "absent"
            status = "absent"
            if st.record is not None:
                st.record, st.removed, status = None, pair, "removed"
                self.rev += 1
            st.order, st.tomb = None, pair
            return status
        if newest is not None and pair < newest:
            return "stale"
        draining = isinstance(ev, model.Drain)
        rec = st.record
        if (
            rec is not None
            and pair[0] == rec.pair[0]
            and (rec.url, rec.draining) == (ev.service_url, draining)
        ):
            if newest is None or pair > newest:
                st.order = pair
            return "refreshed"
        if newest is not None and pair == newest:
            return "stale"
        st.record, st.order = Rec(pair, ev.service_url, draining), pair
        self.rev += 1
        return "updated" if rec is not None else "created"

    def reap(self, sid: str) -> None:
        st = self.states[sid]
        assert st.record is not None
        newest = st.order or st.record.pair
        st.record, st.order, st.tomb, st.removed = None, None, newest, newest
        self.rev += 1


@pytest.fixture(scope="module")
def server() -> Any:
    with RedisServer() as s:
        yield s


class ScriptsMachine(RuleBasedStateMachine):
    url: str = ""
    touched_in_all: int = 0  # touches over all runs: the touch path must be exercised

    def __init__(self) -> None:
        super().__init__()
        self.conns = [redis.Redis.from_url(self.url) for _ in range(2)]  # two registrars
        self.conns[0].flushall()
        for script in scripts.ALL:
            self.conns[0].script_load(script.source)
        self.model = Model()
        self.agents = {sid: Agent(inc=1_000_000 + n * 10) for n, sid in enumerate(IDS)}
        self.published: list[model.AnyEvent] = []
        self.limits = scripts.Limits()
        self.view: dict[str, model.Instance] = {}  # the registrar's view, by key: lags
        self.touches = 0

    def teardown(self) -> None:
        ScriptsMachine.touched_in_all += self.touches
        for c in self.conns:
            c.close()

    def _send(self, ev: model.AnyEvent, conn: int = 0, after_newest: bool = False) -> None:
        rkey = K.inst(ev.service_name, ev.service_id)
        if not after_newest and _touch.touchable(ev, self.view.get(rkey)):
            assert isinstance(ev, model.Announce)
            call = scripts.touch_call(K, [rkey], [ev])
            [reply] = self.conns[conn].execute_command(*call)
            if reply:  # else absent: the registrar applies it in full, below
                self.touches += 1
                got = {1: "refreshed", 2: "stale"}[reply]
                want = self.model.apply(ev, after_newest)
                assert got == want, f"touched {ev!r}: script {got}, model {want}"
                return
        call = scripts.apply_call(K, ev, self.limits, after_newest=after_newest)
        got = scripts.parse_batch(self.conns[conn].execute_command(*call))[0].status
        want = self.model.apply(ev, after_newest)
        assert got == want, f"{ev!r} (after_newest={after_newest}): script {got}, model {want}"

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        sid=st.sampled_from(IDS),
        kind=st.sampled_from(["register", "heartbeat", "heartbeat", "drain"]),
        url=st.sampled_from(URLS),
        with_since=st.sampled_from([True, True, True, False]),
    )
    def publish_announce(self, sid: str, kind: str, url: str, with_since: bool) -> None:
        agent = self.agents[sid]
        agent.seq += 1
        if (url, kind == "drain") != agent.content:  # as Agent does: a change, or after a leave
            agent.content, agent.since = (url, kind == "drain"), agent.seq
        cls = {"register": model.Register, "heartbeat": model.Heartbeat, "drain": model.Drain}
        self.published.append(
            cls[kind](
                service_name="svc",
                service_id=sid,
                incarnation=agent.inc,
                seq=agent.seq,
                service_url=url,
                since=agent.since if with_since else None,  # other agents send none
            )
        )

    @precondition(lambda self: any(a.content for a in self.agents.values()))
    @rule(data=st.data(), with_since=st.sampled_from([True, True, True, False]))
    def publish_heartbeat(self, data: st.DataObject, with_since: bool) -> None:
        """An unchanged heartbeat (the common event): the agent's content again."""
        sid = data.draw(st.sampled_from([s for s in IDS if self.agents[s].content]))
        url, draining = self.agents[sid].content or ("", False)
        self.publish_announce(sid, "drain" if draining else "heartbeat", url, with_since)
        if data.draw(st.booleans()):  # delivered at once (the usual case)
            if data.draw(st.booleans()):
                self.refresh_view(sid)
            self._send(self.published[-1], data.draw(st.integers(0, 1)))

    @precondition(lambda self: any(a.content for a in self.agents.values()))
    @rule(data=st.data())
    def steady_heartbeats(self, data: st.DataObject) -> None:
        """A few unchanged heartbeats delivered at once to a view that caught up."""
        sid = data.draw(st.sampled_from([s for s in IDS if self.agents[s].content]))
        self.refresh_view(sid)
        url, draining = self.agents[sid].content or ("", False)
        for _ in range(data.draw(st.integers(1, 3))):
            self.publish_announce(sid, "drain" if draining else "heartbeat", url, True)
            self._send(self.published[-1], data.draw(st.integers(0, 1)))

    @precondition(lambda self: any(a.content for a in self.agents.values()))
    @rule(data=st.data(), deliver_change=st.booleans())
    def flap(self, data: st.DataObject, deliver_change: bool) -> None:
        """A change and back (A -> B -> A) while the view, caught up at A, lags."""
        sid = data.draw(st.sampled_from([s for s in IDS if self.agents[s].content]))
        self.refresh_view(sid)
        url, draining = self.agents[sid].content or ("", False)
        other = URLS[1 - URLS.index(url)]
        self.publish_announce(sid, "drain" if draining else "heartbeat", other, True)
        if deliver_change:  # else lost or late (delivered later, if at all)
            self._send(self.published[-1], data.draw(st.integers(0, 1)))
        self.publish_announce(sid, "drain" if draining else "heartbeat", url, True)
        self._send(self.published[-1], data.draw(st.integers(0, 1)))

    @precondition(lambda self: any(a.content for a in self.agents.values()))
    @rule(data=st.data())
    def leave_overtaken(self, data: st.DataObject) -> None:
        """A leave, then the same content announced again; the leave arrives last."""
        sid = data.draw(st.sampled_from([s for s in IDS if self.agents[s].content]))
        self.refresh_view(sid)
        url, draining = self.agents[sid].content or ("", False)
        self.publish_leave(sid, False)
        left = self.published[-1]
        self.publish_announce(sid, "drain" if draining else "heartbeat", url, True)
        self._send(self.published[-1], data.draw(st.integers(0, 1)))
        self._send(left, data.draw(st.integers(0, 1)))

    @rule(sid=st.sampled_from(IDS))
    def refresh_view(self, sid: str) -> None:
        """The registrar's view catches up with Redis for one instance."""
        raw = self.conns[0].get(K.inst("svc", sid))
        if raw is None:
            self.view.pop(K.inst("svc", sid), None)
        else:
            self.view[K.inst("svc", sid)] = model.decode_instance(raw)

    @rule(sid=st.sampled_from(IDS), restart=st.booleans())
    def publish_leave(self, sid: str, restart: bool) -> None:
        agent = self.agents[sid]
        agent.seq += 1
        self.published.append(
            model.Leave(service_name="svc", service_id=sid, incarnation=agent.inc, seq=agent.seq)
        )
        if restart:  # the agent runs again: a new incarnation
            agent.inc += 1
            agent.seq = agent.since = 0

    @precondition(lambda self: self.published)
    @rule(data=st.data(), conn=st.integers(0, 1))
    def deliver(self, data: st.DataObject, conn: int) -> None:
        """Any published event, any number of times: late, duplicated, reordered."""
        recent = data.draw(st.booleans())
        n = len(self.published)
        i = n - 1 if recent else data.draw(st.integers(0, n - 1))
        if data.draw(st.booleans()):  # the view has caught up (else it lags)
            self.refresh_view(self.published[i].service_id)
        self._send(self.published[i], conn)

    @rule(sid=st.sampled_from(IDS), url=st.sampled_from(URLS), leave=st.booleans())
    def http_write(self, sid: str, url: str, leave: bool) -> None:
        tomb = self.model.states[sid].tomb
        inc = max(HTTP_INC, tomb[0] + 1 if tomb else 0)
        ev: model.AnyEvent
        if leave:
            ev = model.Leave(service_name="svc", service_id=sid, incarnation=inc, seq=1)
        else:
            ev = model.Register(
                service_name="svc", service_id=sid, incarnation=inc, seq=1, service_url=url
            )
        self._send(ev, 0, after_newest=True)

    @rule(sid=st.sampled_from(IDS))
    def reap(self, sid: str) -> None:
        if self.model.states[sid].record is None:
            return
        r = self.conns[1]
        r.zadd(K.deadlines, {K.inst("svc", sid): 1})  # its deadline is due
        keys, args = scripts.reap_call(K, 1000, 10**12, 10_000, 600_000)  # no stall grace
        due = r.evalsha(scripts.REAP.sha, len(keys), *keys, *args)
        assert due == [K.inst("svc", sid).encode()]
        self.model.reap(sid)

    @invariant()
    def stored_equals_model(self) -> None:
        r = self.conns[0]
        for sid in IDS:
            raw = r.get(K.inst("svc", sid))
            want = self.model.states[sid].record
            if want is None:
                assert raw is None, f"{sid}: stored {raw!r}, model has none"
                continue
            assert raw is not None, f"{sid}: model has {want}, nothing stored"
            inst = model.decode_instance(raw)
            assert ((inst.incarnation, inst.seq), inst.service_url, inst.draining) == (
                want.pair,
                want.url,
                want.draining,
            )
            removed = self.model.states[sid].removed
            assert removed is None or want.pair > removed, "resurrected by an older event"
        assert int(r.get(K.rev) or 0) == self.model.rev
        assert r.scard(K.index) == sum(s.record is not None for s in self.model.states.values())


def test_scripts_match_the_model(server: RedisServer) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    ScriptsMachine.url = server.url
    run_state_machine_as_test(
        ScriptsMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    assert ScriptsMachine.touched_in_all > 0, "no delivery went through the touch path"
