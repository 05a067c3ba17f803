"""Elastic membership: who is in a projection's group, and each member's fair share of its partitions.

A member is a database session holding a *member lock*, a session advisory
lock keyed ``(hashtext('<projection>/<partitions>/members'), member number)``;
it owns the partitions whose ownership locks (consume/ownership.py) that
same session holds. Membership and ownership are therefore judged by the
server alone: a member whose session ends (kill -9, a lost network, a
database restart) stops being a member and owns nothing at the same
instant, with no heartbeat, lease or host clock involved.

The fair share: members ranked by number (numbers grow in join order),
member ``r`` of ``N`` gets ``A // N`` of the ``A`` partitions no other kind of
process holds, plus one for ``r < A % N``. How that keeps moves to the
joiner's or leaver's own share: ``docs/concepts/elastic.md``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from psycopg import sql

from projectionist.consume.ownership import group_key
from projectionist.store.connection import Connection

#: Members NOTIFY here (payload: the projection's name) when they join, leave or release partitions.
MEMBERS_CHANNEL = "projectionist_members"


def members_key(projection: str, total_workers: int) -> str:
    """The first key of a group's member locks."""
    return f"{group_key(projection, total_workers)}/members"


def fair_share(available: int, members: int, rank: int) -> int:
    """Partitions member ``rank`` (0-based, by member number) of ``members`` should own.

    The shares of all ranks add up to ``available`` and differ by at most one.
    """
    if members < 1 or not 0 <= rank < members or available < 0:
        raise ValueError(f"no fair share for rank {rank} of {members} members over {available} partitions")
    return available // members + (1 if rank < available % members else 0)


@dataclass(frozen=True, slots=True)
class GroupView:
    """One reading of a group's locks from ``pg_locks``: its members and who holds which partition."""

    #: The group's partition count in ``projection_groups`` now (None: the group is gone).
    total_workers: int | None
    #: Member number -> backend pid, for every member lock held.
    members: dict[int, int]
    #: Partition -> backend pid of the session holding its ownership lock.
    owners: dict[int, int]

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(sorted(self.members))

    def foreign(self) -> set[int]:
        """Partitions held by sessions that are not members: static workers of the same group."""
        member_pids = set(self.members.values())
        return {k for k, pid in self.owners.items() if pid not in member_pids}

    def target(self, number: int, partitions: int) -> int:
        """Member ``number``'s fair share of the partitions that no static worker holds."""
        numbers = self.numbers
        return fair_share(partitions - len(self.foreign()), len(numbers), numbers.index(number))

    def free(self, partitions: int) -> list[int]:
        """Partitions nobody holds: a move in progress, or a share nobody took up yet."""
        return [k for k in range(partitions) if k not in self.owners]


@dataclass(frozen=True, slots=True)
class Plan:
    """What one member does at a rebalance: release some partitions, or try to take some."""

    target: int
    release: tuple[int, ...] = ()
    #: Free partitions to try, in order, until ``want`` of them are taken.
    candidates: tuple[int, ...] = ()
    want: int = 0


def plan(
    view: GroupView,
    number: int,
    partitions: int,
    owned: Iterable[int],
    rng: random.Random | None = None,
) -> Plan:
    """Member ``number``'s next step towards its fair share, ``owned`` being what it holds now.

    Over its share, it releases the surplus (the highest-numbered of its
    partitions). Under it, it tries free partitions in a random order, so
    that members taking over a leaver's share at the same moment rarely try
    the same one first; a partition two of them try is taken by one, and the
    other tries the next.
    """
    mine = sorted(owned)
    target = view.target(number, partitions)
    if len(mine) > target:
        return Plan(target, release=tuple(mine[target:]))
    if len(mine) < target:
        free = view.free(partitions)
        (rng or random).shuffle(free)
        return Plan(target, candidates=tuple(free), want=target - len(mine))
    return Plan(target)


# One statement for the whole view: the group's partition count, then each
# ownership or member lock of this group in this database, with its holder.
# Keys are compared as pg_locks shows them: the first int4 of a two-key
# advisory lock as an unsigned oid in classid, the second in objid.
_VIEW = sql.SQL(
    """
    SELECT 'group' AS kind, g.total_workers::bigint AS key, NULL::int AS pid
      FROM projection_groups g WHERE g.projection_name = %(projection)s
    UNION ALL
    SELECT CASE WHEN l.classid::bigint = (hashtext(%(members)s)::bigint & 4294967295)
                THEN 'member' ELSE 'partition' END,
           l.objid::bigint, l.pid
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid::bigint IN ((hashtext(%(partitions)s)::bigint & 4294967295),
                                 (hashtext(%(members)s)::bigint & 4294967295))
    """
)


def read_view(conn: Connection, projection: str, total_workers: int) -> GroupView:
    """The group's members and partition owners, as the server sees them now."""
    rows = conn.execute(
        _VIEW,
        {
            "projection": projection,
            "partitions": group_key(projection, total_workers),
            "members": members_key(projection, total_workers),
        },
    ).fetchall()
    total: int | None = None
    members: dict[int, int] = {}
    owners: dict[int, int] = {}
    for kind, key, pid in rows:
        if kind == "group":
            total = int(key)
        elif kind == "member":
            members[int(key)] = int(pid)
        elif int(key) < total_workers:
            owners[int(key)] = int(pid)
    return GroupView(total, members, owners)


_TRY_MEMBER = sql.SQL(
    "SELECT n, pg_try_advisory_lock(hashtext(%s), n)"
    " FROM (SELECT nextval('projection_member_numbers')::int AS n) s"
)


def join(conn: Connection, projection: str, total_workers: int, attempts: int = 100) -> int:
    """Take a member lock on ``conn``'s session; returns the member number.

    Numbers come from a sequence, so they grow in join order; one still
    held by a session from before the sequence wrapped around is skipped.
    """
    key = members_key(projection, total_workers)
    for _ in range(attempts):
        row = conn.execute(_TRY_MEMBER, (key,)).fetchone()
        assert row is not None
        if row[1]:
            return int(row[0])
    raise RuntimeError(f"no free member number for {key} after {attempts} attempts")


_TRY_PARTITIONS = sql.SQL(
    "SELECT k FROM unnest(%s::int[]) WITH ORDINALITY AS t(k, i)"
    " WHERE pg_try_advisory_lock(hashtext(%s), k) ORDER BY i"
)


def try_acquire(
    conn: Connection, projection: str, total_workers: int, candidates: Sequence[int]
) -> list[int]:
    """Try the ownership locks of ``candidates`` in one round trip; the partitions taken."""
    if not candidates:
        return []
    rows = conn.execute(_TRY_PARTITIONS, (list(candidates), group_key(projection, total_workers)))
    return [int(r[0]) for r in rows]


def try_acquire_up_to(
    conn: Connection, projection: str, total_workers: int, candidates: Sequence[int], want: int
) -> list[int]:
    """Take at most ``want`` of ``candidates``, trying them in turn until enough are taken."""
    taken: list[int] = []
    queue = list(candidates)
    while queue and len(taken) < want:
        batch, queue = queue[: want - len(taken)], queue[want - len(taken) :]
        taken += try_acquire(conn, projection, total_workers, batch)
    return taken


def release(conn: Connection, projection: str, total_workers: int, partition: int) -> bool:
    """Release one partition's ownership lock; False if this session did not hold it."""
    row = conn.execute(
        "SELECT pg_advisory_unlock(hashtext(%s), %s)", (group_key(projection, total_workers), partition)
    ).fetchone()
    return bool(row and row[0])


def notify(conn: Connection, projection: str) -> None:
    """Tell the other members to look at the group now (autocommit: sent at once)."""
    conn.execute("SELECT pg_notify(%s, %s)", (MEMBERS_CHANNEL, projection))


# -- what `projectionist status` shows ------------------------------------------


def ranges(partitions: Iterable[int]) -> str:
    """``0-3,7`` for partitions 0, 1, 2, 3 and 7; ``none`` for no partition."""
    ordered = sorted(partitions)
    if not ordered:
        return "none"
    parts: list[str] = []
    start = prev = ordered[0]
    for k in [*ordered[1:], None]:
        if k is None or k != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            if k is None:
                break
            start = k
        prev = k
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One elastic member of a group, as ``status`` shows it."""

    number: int
    #: The member's name (pod or host name), from its session's application_name.
    name: str
    pid: int
    owned: tuple[int, ...]
    target: int


@dataclass(frozen=True, slots=True)
class GroupMembership:
    """A group's elastic members, the partitions other processes hold, and the moves in progress."""

    projection: str
    total_workers: int
    members: tuple[MemberStatus, ...]
    #: Partitions held by processes that are not members (static workers): partition -> pid.
    static_owners: dict[int, int] = field(default_factory=dict)
    #: Partitions nobody holds: moving between members, or waiting for a worker.
    unowned: tuple[int, ...] = ()

    @property
    def moving(self) -> int:
        """Partitions still to change hands before every member holds its share."""
        surplus = sum(max(0, len(m.owned) - m.target) for m in self.members)
        return surplus + (len(self.unowned) if self.members else 0)

    def as_json(self) -> dict[str, object]:
        return {
            "members": [
                {"number": m.number, "name": m.name, "pid": m.pid, "owned": list(m.owned), "target": m.target}
                for m in self.members
            ],
            "static_owners": {str(k): pid for k, pid in sorted(self.static_owners.items())},
            "unowned": list(self.unowned),
            "moving": self.moving,
        }


#: application_name of an elastic worker's session: ``projectionist:<projection>:elastic:<name>``.
ELASTIC_APPLICATION = "projectionist:{projection}:elastic:{name}"


def application_name(projection: str, name: str) -> str:
    # PostgreSQL keeps the first 63 bytes of application_name.
    return ELASTIC_APPLICATION.format(projection=projection, name=name)[:63]


def read_membership(conn: Connection, projection: str, total_workers: int) -> GroupMembership:
    """The group's members with their names, shares and partitions, for ``status``."""
    view = read_view(conn, projection, total_workers)
    names: dict[int, str] = {}
    if view.members:
        prefix = ELASTIC_APPLICATION.format(projection=projection, name="")
        for pid, app in conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE pid = ANY(%s)",
            (list(view.members.values()),),
        ):
            text = str(app or "")
            names[int(pid)] = text[len(prefix) :] if text.startswith(prefix) else text
    by_pid: dict[int, list[int]] = {}
    for k, pid in view.owners.items():
        by_pid.setdefault(pid, []).append(k)
    members = tuple(
        MemberStatus(
            number=n,
            name=names.get(view.members[n], ""),
            pid=view.members[n],
            owned=tuple(sorted(by_pid.get(view.members[n], []))),
            target=view.target(n, total_workers),
        )
        for n in view.numbers
    )
    foreign = view.foreign()
    return GroupMembership(
        projection,
        total_workers,
        members,
        {k: view.owners[k] for k in sorted(foreign)},
        tuple(view.free(total_workers)),
    )
