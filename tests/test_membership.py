"""Elastic membership (consume/membership.py): the fair share, the plan, and the locks behind them.

The properties are what elastic mode promises: shares add up and differ by at
most one, and because member numbers grow in join order, a join only takes
partitions from the members already there and a leave only hands out the
leaver's, so the moves of one change are exactly the joiner's or leaver's share.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projectionist.consume import membership
from projectionist.consume.checkpoints import register_group
from projectionist.consume.membership import GroupView, fair_share, plan
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.store.connection import Connection, connect


def _targets(partitions: int, members: int) -> list[int]:
    return [fair_share(partitions, members, r) for r in range(members)]


@given(st.integers(0, 300), st.integers(1, 80))
def test_the_shares_add_up_and_differ_by_at_most_one(partitions: int, members: int) -> None:
    targets = _targets(partitions, members)
    assert sum(targets) == partitions
    assert max(targets) - min(targets) <= 1
    assert targets == sorted(targets, reverse=True)  # the extra ones go to the oldest members


@given(st.integers(1, 300), st.integers(1, 80))
def test_a_join_only_takes_from_the_members_already_there(partitions: int, members: int) -> None:
    before, after = _targets(partitions, members), _targets(partitions, members + 1)
    # The joiner ranks last; no old member's share grows, so nothing moves between old members.
    assert all(a <= b for a, b in zip(after, before, strict=False))
    moves = sum(b - a for a, b in zip(after, before, strict=False))
    assert moves == after[-1] <= math.ceil(partitions / (members + 1))


@given(st.integers(1, 300), st.integers(2, 80), st.data())
def test_a_leave_only_hands_out_the_leavers_partitions(
    partitions: int, members: int, data: st.DataObject
) -> None:
    leaver = data.draw(st.integers(0, members - 1))
    before = _targets(partitions, members)
    after = _targets(partitions, members - 1)
    stayers = [t for r, t in enumerate(before) if r != leaver]
    assert all(a >= b for a, b in zip(after, stayers, strict=True))
    assert sum(a - b for a, b in zip(after, stayers, strict=True)) == before[leaver]
    assert before[leaver] <= math.ceil(partitions / members)


def test_no_fair_share_for_a_rank_outside_the_group() -> None:
    with pytest.raises(ValueError, match="rank 3 of 3"):
        fair_share(16, 3, 3)


def _view(members: dict[int, int], owners: dict[int, int], total: int = 16) -> GroupView:
    return GroupView(total, members, owners)


def test_a_member_over_its_share_releases_its_highest_partitions() -> None:
    # Members 5 (pid 50) and 9 (pid 90): 8 each; 5 still holds 12.
    view = _view({5: 50, 9: 90}, {k: 50 for k in range(12)})
    step = plan(view, 5, 16, range(12))
    assert (step.target, step.release, step.want) == (8, (8, 9, 10, 11), 0)


def test_a_member_under_its_share_tries_free_partitions_only() -> None:
    view = _view({5: 50, 9: 90}, {**{k: 50 for k in range(12)}, 15: 90})
    step = plan(view, 9, 16, [15], random.Random(1))
    assert step.target == 8 and step.want == 7 and not step.release
    assert sorted(step.candidates) == [12, 13, 14]  # 0-11 are 5's until it releases them


def test_partitions_a_static_worker_holds_are_left_out_of_the_shares() -> None:
    # Static worker pid 70 holds 0-3: the two members share the other 12.
    view = _view({5: 50, 9: 90}, {k: 70 for k in range(4)})
    assert view.foreign() == {0, 1, 2, 3}
    assert [view.target(n, 16) for n in (5, 9)] == [6, 6]
    assert 0 not in plan(view, 5, 16, []).candidates


def test_members_beyond_the_partitions_get_none() -> None:
    view = _view({n: n * 10 for n in range(1, 6)}, {}, total=3)
    assert [view.target(n, 3) for n in range(1, 6)] == [1, 1, 1, 0, 0]


# -- with the server's locks ---------------------------------------------------------------------


@pytest.mark.integration
def test_the_view_reads_members_and_owners_from_the_servers_locks(db_url: str) -> None:
    with (
        connect(db_url, autocommit=True) as a,
        connect(db_url, autocommit=True) as b,
        connect(db_url, autocommit=True) as static,
    ):
        register_group(a, "p", 8)
        first = membership.join(a, "p", 8)
        second = membership.join(b, "p", 8)
        assert second > first  # join order
        assert membership.try_acquire(a, "p", 8, [0, 1, 2]) == [0, 1, 2]
        # Already held by a: b gets only what is free, in the order asked.
        assert membership.try_acquire_up_to(b, "p", 8, [2, 1, 5, 6, 7], 2) == [5, 6]
        static.execute(TRY_LOCK, (group_key("p", 8), 3))
        # A lock of another group (another partition count) is not this group's.
        static.execute(TRY_LOCK, (group_key("p", 4), 4))
        view = membership.read_view(a, "p", 8)
        pa, pb, ps = (c.info.backend_pid for c in (a, b, static))
        assert view.total_workers == 8
        assert view.members == {first: pa, second: pb}
        assert view.owners == {0: pa, 1: pa, 2: pa, 5: pb, 6: pb, 3: ps}
        assert view.foreign() == {3}
        assert membership.release(a, "p", 8, 2) is True
        assert membership.release(a, "p", 8, 2) is False
        status = membership.read_membership(a, "p", 8)
        assert [(m.number, m.owned, m.target) for m in status.members] == [
            (first, (0, 1), 4),
            (second, (5, 6), 3),
        ]
        assert status.static_owners == {3: ps} and status.unowned == (2, 4, 7)
        assert status.moving == 3
    with connect(db_url, autocommit=True) as c:
        # Their sessions ended: no member, no owner, no lock left behind.
        view = membership.read_view(c, "p", 8)
        assert (view.members, view.owners) == ({}, {})


@pytest.mark.integration
def test_a_member_number_still_held_is_skipped(db_url: str, conn: Connection) -> None:
    register_group(conn, "p", 4)
    with connect(db_url, autocommit=True) as other:
        row = other.execute("SELECT nextval('projection_member_numbers')").fetchone()
        assert row is not None
        # Another session holds the number the sequence hands out next.
        nxt = int(row[0]) + 1
        other.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (membership.members_key("p", 4), nxt))
        assert membership.join(conn, "p", 4) == nxt + 1
