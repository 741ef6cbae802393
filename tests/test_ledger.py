"""The sans-IO call ledger: offers, answers, timeouts, failover and drains, on plain calls."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from router.relay.ledger import Call, CallLedger, Lane, Offer
from router.wire.frames import CALL, Frame


async def _reply(text: str) -> None:
    """Stands for another source's link; the ledger never calls it."""


def call(message_id: str, action: str = "Heartbeat", *, reply: bool = False) -> Call:
    frame = Frame(CALL, message_id, action=action, payload={})
    if reply:
        return Call(frame, None, _reply, f"origin-{message_id}")
    return Call(frame, f'[2,"{message_id}","{action}",{{}}]')


def queued(lane: Lane) -> list[Call]:
    return list(lane.queue or ())


# -- offer ----------------------------------------------------------------------------------


def test_a_fresh_ledger_is_idle_with_two_named_empty_lanes() -> None:
    ledger = CallLedger()
    assert ledger.idle()
    assert (ledger.up.name, ledger.down.name) == ("up", "down")
    for lane in (ledger.up, ledger.down):
        assert lane.current is None and not lane.queue


def test_an_offer_on_an_idle_lane_is_sent_and_becomes_current() -> None:
    ledger = CallLedger()
    first = call("1")
    assert ledger.offer(ledger.up, first, limit=3) is Offer.SEND
    assert ledger.up.current is first
    assert ledger.up.token > 0
    assert not ledger.up.queue
    assert not ledger.idle()


def test_further_offers_queue_up_to_the_limit_then_are_busy() -> None:
    ledger = CallLedger()
    lane = ledger.up
    calls = [call(str(n)) for n in range(5)]
    results = [ledger.offer(lane, c, limit=2) for c in calls]
    assert results == [Offer.SEND, Offer.QUEUED, Offer.QUEUED, Offer.BUSY, Offer.BUSY]
    assert lane.current is calls[0]
    assert queued(lane) == calls[1:3]


def test_a_limit_of_zero_lets_nothing_wait() -> None:
    ledger = CallLedger()
    lane = ledger.down
    first, second = call("1"), call("2")
    assert ledger.offer(lane, first, limit=0) is Offer.SEND
    assert ledger.offer(lane, second, limit=0) is Offer.BUSY
    assert lane.current is first and not lane.queue


def test_a_zero_limit_still_refuses_once_a_queue_has_been_made_and_emptied() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b, c = call("a"), call("b"), call("c")
    ledger.offer(lane, a, limit=1)
    assert ledger.offer(lane, b, limit=1) is Offer.QUEUED
    assert ledger.finish(lane, "a") == (a, b)
    assert lane.queue is not None and not lane.queue  # an empty deque, kept
    assert ledger.offer(lane, c, limit=0) is Offer.BUSY
    assert lane.current is b and not lane.queue


def test_a_lower_limit_refuses_new_offers_but_keeps_what_already_waits() -> None:
    ledger = CallLedger()
    lane = ledger.up
    calls = [call(str(n)) for n in range(4)]
    for c in calls[:3]:
        ledger.offer(lane, c, limit=5)
    assert ledger.offer(lane, calls[3], limit=1) is Offer.BUSY
    assert queued(lane) == calls[1:3]


def test_a_busy_offer_changes_nothing() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b, c = call("a"), call("b"), call("c")
    ledger.offer(lane, a, limit=1)
    ledger.offer(lane, b, limit=1)
    token = lane.token
    assert ledger.offer(lane, c, limit=1) is Offer.BUSY
    assert lane.current is a and queued(lane) == [b] and lane.token == token


# -- finish ---------------------------------------------------------------------------------


def test_finish_with_the_current_id_moves_the_next_call_into_flight_with_a_new_token() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b, c = call("a"), call("b"), call("c")
    for x in (a, b, c):
        ledger.offer(lane, x, limit=5)
    token_a = lane.token
    finished = ledger.finish(lane, "a")
    assert finished is not None
    done, following = finished
    assert done is a and following is b
    assert lane.current is b and queued(lane) == [c]
    assert lane.token != token_a


def test_finish_of_the_last_call_leaves_the_lane_empty() -> None:
    ledger = CallLedger()
    lane = ledger.down
    a = call("a", reply=True)
    ledger.offer(lane, a, limit=5)
    assert ledger.finish(lane, "a") == (a, None)
    assert lane.current is None and not lane.queue
    assert ledger.idle()


def test_finish_with_a_wrong_id_answers_nothing_and_changes_nothing() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b = call("a"), call("b")
    ledger.offer(lane, a, limit=5)
    ledger.offer(lane, b, limit=5)
    token = lane.token
    assert ledger.finish(lane, "zz") is None
    assert ledger.finish(lane, "b") is None  # queued, not in flight: nothing to answer
    assert lane.current is a and queued(lane) == [b] and lane.token == token


def test_finish_on_an_empty_lane_is_none() -> None:
    ledger = CallLedger()
    assert ledger.finish(ledger.up, "a") is None
    assert ledger.up.current is None and not ledger.up.queue


def test_finish_twice_with_the_same_id_answers_once() -> None:
    ledger = CallLedger()
    a = call("a")
    ledger.offer(ledger.up, a, limit=1)
    assert ledger.finish(ledger.up, "a") == (a, None)
    assert ledger.finish(ledger.up, "a") is None


def test_a_queued_call_with_the_same_id_is_answered_only_once_in_flight() -> None:
    ledger = CallLedger()
    lane = ledger.up
    first, again = call("same"), call("same")
    ledger.offer(lane, first, limit=1)
    ledger.offer(lane, again, limit=1)
    assert ledger.finish(lane, "same") == (first, again)
    assert ledger.finish(lane, "same") == (again, None)
    assert ledger.finish(lane, "same") is None


# -- expire ---------------------------------------------------------------------------------


def test_expire_with_the_current_token_ends_the_call_in_flight() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b = call("a"), call("b")
    ledger.offer(lane, a, limit=1)
    ledger.offer(lane, b, limit=1)
    token = lane.token
    assert ledger.expire(lane, token) == (a, b)
    assert lane.current is b and lane.token != token


def test_a_stale_token_after_finish_expires_nothing() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b = call("a"), call("b")
    ledger.offer(lane, a, limit=1)
    ledger.offer(lane, b, limit=1)
    stale = lane.token
    ledger.finish(lane, "a")
    assert ledger.expire(lane, stale) is None
    assert lane.current is b
    # ... also once the lane has emptied and the stale token is still the lane's last one
    ledger.finish(lane, "b")
    assert ledger.expire(lane, lane.token) is None
    assert ledger.expire(lane, stale) is None


def test_expire_on_an_empty_lane_is_none() -> None:
    ledger = CallLedger()
    assert ledger.expire(ledger.down, ledger.down.token) is None


def test_a_token_of_the_other_lane_expires_nothing() -> None:
    ledger = CallLedger()
    up, down = call("u"), call("d")
    ledger.offer(ledger.up, up, limit=1)
    ledger.offer(ledger.down, down, limit=1)
    assert ledger.up.token != ledger.down.token
    assert ledger.expire(ledger.up, ledger.down.token) is None
    assert ledger.up.current is up and ledger.down.current is down


def test_tokens_never_repeat_across_lanes_and_ledgers() -> None:
    seen: set[int] = set()
    for _ in range(3):
        ledger = CallLedger()
        for lane in (ledger.up, ledger.down):
            for n in range(3):
                ledger.offer(lane, call(str(n)), limit=5)
            seen.add(lane.token)
            for n in range(3):
                ledger.finish(lane, str(n))
                if lane.current is not None:
                    assert lane.token not in seen
                    seen.add(lane.token)
    assert len(seen) == 3 * 2 * 3


# -- abandon, drain, idle -------------------------------------------------------------------


def test_abandon_ends_the_call_in_flight_and_sends_the_next() -> None:
    ledger = CallLedger()
    lane = ledger.up
    a, b = call("a"), call("b")
    ledger.offer(lane, a, limit=1)
    ledger.offer(lane, b, limit=1)
    token = lane.token
    assert ledger.abandon(lane) == (a, b)
    assert lane.current is b and lane.token != token
    assert ledger.abandon(lane) == (b, None)
    assert ledger.abandon(lane) is None
    assert lane.current is None and not lane.queue


async def _discard(text: str) -> None:
    """Where an orphaned CALL's answer goes; the ledger never calls it."""


def test_orphan_keeps_the_call_in_flight_drops_the_callers_queue_and_keeps_others() -> None:
    ledger = CallLedger()
    lane = ledger.down
    own, other, own_later, other_later = (call("a"), call("b", reply=True), call("c"),
                                          call("d", reply=True))
    for c in (own, other, own_later, other_later):
        ledger.offer(lane, c, limit=5)
    token = lane.token
    ledger.orphan(lane, _discard)
    assert lane.current is own and lane.token == token  # still in flight, same clock
    assert own.reply is _discard
    assert queued(lane) == [other, other_later] and other.reply is _reply
    assert ledger.finish(lane, "a") == (own, other)  # its answer ends it; the next goes
    ledger.orphan(lane, _discard)  # another source's CALL in flight is left alone
    assert lane.current is other and other.reply is _reply
    assert queued(lane) == [other_later]


def test_orphan_of_a_queue_of_only_the_callers_calls_leaves_no_queue() -> None:
    ledger = CallLedger()
    lane = ledger.down
    ledger.offer(lane, call("a"), limit=5)
    ledger.offer(lane, call("b"), limit=5)
    ledger.orphan(lane, _discard)
    assert lane.queue is None
    assert ledger.abandon(lane) is not None and ledger.idle()


def test_drain_returns_current_then_queued_oldest_first_and_empties_the_lane() -> None:
    ledger = CallLedger()
    lane = ledger.down
    calls = [call("a"), call("b", reply=True), call("c")]
    for c in calls:
        ledger.offer(lane, c, limit=5)
    owed = ledger.drain(lane)
    assert owed == calls and all(x is y for x, y in zip(owed, calls, strict=True))
    assert owed[1].reply is _reply and owed[1].origin_id == "origin-b"
    assert lane.current is None and not lane.queue
    assert ledger.drain(lane) == []
    assert ledger.idle()
    # the lane is usable again, and a token from before the drain is stale
    stale = lane.token
    d = call("d")
    assert ledger.offer(lane, d, limit=0) is Offer.SEND
    assert ledger.expire(lane, stale) is None
    assert lane.current is d


def test_idle_means_no_call_in_flight_either_way() -> None:
    ledger = CallLedger()
    ledger.offer(ledger.down, call("d"), limit=0)
    assert not ledger.idle()
    ledger.offer(ledger.up, call("u"), limit=0)
    ledger.finish(ledger.down, "d")
    assert not ledger.idle()
    ledger.finish(ledger.up, "u")
    assert ledger.idle()


def test_up_and_down_lanes_are_independent() -> None:
    ledger = CallLedger()
    up, down = call("1"), call("1", reply=True)  # the same id on both lanes
    assert ledger.offer(ledger.up, up, limit=0) is Offer.SEND
    assert ledger.offer(ledger.down, down, limit=0) is Offer.SEND  # not busy: other lane
    assert ledger.finish(ledger.down, "1") == (down, None)
    assert ledger.up.current is up
    assert ledger.drain(ledger.down) == []
    assert ledger.drain(ledger.up) == [up]


def test_call_properties_read_the_frame() -> None:
    c = call("m1", "BootNotification")
    assert (c.message_id, c.action) == ("m1", "BootNotification")
    assert Call(Frame(CALL, "m2"), None).action == ""


# -- the contract, as a state machine -------------------------------------------------------

LANES = ("up", "down")
IDS = ("1", "2", "3", "x")  # few ids: duplicates within and across lanes are common


class LedgerMachine(RuleBasedStateMachine):
    """Callers on both lanes against a model: a FIFO list per lane of the CALLs it owes."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = CallLedger()
        self.limits = {"up": 0, "down": 0}
        self.model: dict[str, list[Call]] = {"up": [], "down": []}
        self.lane_of: dict[int, str] = {}  # id(call) -> the lane it was offered on
        self.offered: list[Call] = []  # keeps every Call alive, so id() stays unique
        self.out: dict[int, int] = {}  # id(call) -> how many times it came out
        self.left: dict[str, list[Call]] = {"up": [], "down": []}  # done, in order
        self.tokens: dict[str, list[int]] = {"up": [], "down": []}  # every token issued
        self.serial = itertools.count()

    @initialize(up=st.integers(0, 3), down=st.integers(0, 3))
    def set_limits(self, up: int, down: int) -> None:
        self.limits = {"up": up, "down": down}

    def lane(self, name: str) -> Lane:
        return self.ledger.up if name == "up" else self.ledger.down

    def came_out(self, name: str, c: Call) -> None:
        assert self.lane_of[id(c)] == name, "a CALL left a lane it was not offered on"
        self.out[id(c)] += 1
        assert self.out[id(c)] == 1, "a CALL came out twice"

    def new_token(self, name: str) -> None:
        token = self.lane(name).token
        assert all(token not in issued for issued in self.tokens.values()), "a token repeated"
        self.tokens[name].append(token)

    def check_finished(self, name: str, result: tuple[Call, Call | None] | None,
                       expected_to_end: bool) -> None:
        model = self.model[name]
        if not expected_to_end:
            assert result is None
            return
        assert result is not None
        done, following = result
        assert done is model[0], "not the CALL in flight"
        self.came_out(name, done)
        self.left[name].append(done)
        model.pop(0)
        expected_following = model[0] if model else None
        assert following is expected_following
        assert self.lane(name).current is following
        if following is not None:
            self.new_token(name)

    @rule(name=st.sampled_from(LANES), message_id=st.sampled_from(IDS), reply=st.booleans())
    def offer(self, name: str, message_id: str, reply: bool) -> None:
        lane = self.lane(name)
        c = call(f"{message_id}", f"Action{next(self.serial)}", reply=reply)
        self.offered.append(c)
        self.lane_of[id(c)] = name
        self.out[id(c)] = 0
        model, limit = self.model[name], self.limits[name]
        result = self.ledger.offer(lane, c, limit)
        if not model:
            assert result is Offer.SEND
            assert lane.current is c
            self.new_token(name)
            model.append(c)
        elif len(model) - 1 < limit:
            assert result is Offer.QUEUED
            assert lane.current is model[0]
            model.append(c)
        else:
            assert result is Offer.BUSY
            self.came_out(name, c)

    @precondition(lambda self: self.model["up"] or self.model["down"])
    @rule(name=st.sampled_from(LANES))
    def answer_matching(self, name: str) -> None:
        model = self.model[name]
        if not model:
            return
        result = self.ledger.finish(self.lane(name), model[0].frame.id)
        self.check_finished(name, result, expected_to_end=True)

    @rule(name=st.sampled_from(LANES), message_id=st.sampled_from((*IDS, "nope")))
    def answer_any(self, name: str, message_id: str) -> None:
        """An answer with some id: it may match this lane's CALL in flight, or only the
        other lane's (which it must never end), or nothing."""
        model = self.model[name]
        matches = bool(model) and model[0].frame.id == message_id
        result = self.ledger.finish(self.lane(name), message_id)
        self.check_finished(name, result, expected_to_end=matches)

    @rule(name=st.sampled_from(LANES))
    def answer_with_the_other_lanes_id(self, name: str) -> None:
        other = self.model["down" if name == "up" else "up"]
        if not other:
            return
        message_id = other[0].frame.id
        model = self.model[name]
        matches = bool(model) and model[0].frame.id == message_id
        result = self.ledger.finish(self.lane(name), message_id)
        self.check_finished(name, result, expected_to_end=matches)

    @rule(name=st.sampled_from(LANES))
    def timeout_current(self, name: str) -> None:
        model = self.model[name]
        result = self.ledger.expire(self.lane(name), self.lane(name).token)
        self.check_finished(name, result, expected_to_end=bool(model))

    @rule(name=st.sampled_from(LANES), pick=st.integers(0, 2**16), other_lane=st.booleans())
    def timeout_stale(self, name: str, pick: int, other_lane: bool) -> None:
        # every token this lane issued before its latest is stale; the other lane's never fit
        source = self.tokens["down" if name == "up" else "up"] if other_lane else (
            self.tokens[name][:-1])
        if not source:
            return
        token = source[pick % len(source)]
        assert token != self.lane(name).token
        assert self.ledger.expire(self.lane(name), token) is None

    @rule(name=st.sampled_from(LANES))
    def abandon(self, name: str) -> None:
        result = self.ledger.abandon(self.lane(name))
        self.check_finished(name, result, expected_to_end=bool(self.model[name]))

    @rule(name=st.sampled_from(LANES))
    def drain(self, name: str) -> None:
        owed = self.ledger.drain(self.lane(name))
        model = self.model[name]
        assert len(owed) == len(model)
        assert all(x is y for x, y in zip(owed, model, strict=True)), "drain order"
        for c in owed:
            self.came_out(name, c)
            self.left[name].append(c)
        model.clear()

    @invariant()
    def lanes_match_the_model(self) -> None:
        for name in LANES:
            lane, model = self.lane(name), self.model[name]
            if lane.current is None:
                assert not lane.queue, "a lane with nothing in flight has a queue"
                assert model == []
            else:
                assert lane.current is model[0]
                assert all(x is y for x, y in zip(queued(lane), model[1:], strict=True))
            assert len(queued(lane)) <= self.limits[name]

    @invariant()
    def every_call_is_out_at_most_once_or_still_owed(self) -> None:
        owed = {id(c) for model in self.model.values() for c in model}
        for c in self.offered:
            times = self.out[id(c)]
            assert times == (0 if id(c) in owed else 1), "a CALL was lost or came out twice"

    @invariant()
    def calls_leave_each_lane_in_the_order_offered(self) -> None:
        for name in LANES:
            order = [c for c in self.offered if self.lane_of[id(c)] == name]
            position = {id(c): n for n, c in enumerate(order)}
            left = [position[id(c)] for c in self.left[name]]
            assert left == sorted(left)

    @invariant()
    def idle_agrees(self) -> None:
        assert self.ledger.idle() == (not self.model["up"] and not self.model["down"])

    def teardown(self) -> None:
        # whatever is still owed comes out in a final drain: then nothing is lost
        for name in LANES:
            self.drain(name)
        assert all(times == 1 for times in self.out.values())


LedgerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, derandomize=True, deadline=None
)
TestLedger = LedgerMachine.TestCase


def test_the_machine_model_is_not_vacuous() -> None:
    """A scripted run through the machine's rules, so a broken model shows up here too."""
    machine = LedgerMachine()
    machine.set_limits(up=1, down=0)
    machine.offer("up", "1", reply=False)
    machine.offer("up", "2", reply=True)
    machine.offer("up", "3", reply=False)  # busy: the limit is 1
    machine.offer("down", "1", reply=True)
    machine.answer_with_the_other_lanes_id("up")  # "1" is also up's id: it ends up's call
    machine.timeout_stale("up", 0, other_lane=False)
    machine.answer_any("down", "nope")
    machine.timeout_current("down")
    machine.lanes_match_the_model()
    machine.every_call_is_out_at_most_once_or_still_owed()
    assert [c.frame.id for c in machine.left["up"]] == ["1"]
    assert [c.frame.id for c in machine.left["down"]] == ["1"]
    assert sum(machine.out.values()) == 3  # one busy, two done; "2" still in flight
    machine.teardown()

