"""The provider simulator keeps every request for the life of the process; the garbage
collector must not walk them all on each full collection (the provider would stop answering
for as long as that takes, more the more it was sent).
"""

from __future__ import annotations

import gc

from services.simulator.app import FREEZE_EVERY, Simulator


def test_kept_requests_leave_the_collectors_walk() -> None:
    sim = Simulator()
    # Records hold containers (a request's body), which the collector tracks.
    first: dict[str, object] = {"body": [0]}
    assert gc.is_tracked(first)
    sim.receive("h", first)
    for n in range(1, FREEZE_EVERY):
        sim.receive("h", {"body": [n]})
    try:
        assert len(sim.hook("h").records) == FREEZE_EVERY
        # A full collection no longer sees them (nor the list that holds them) ...
        walked = gc.get_objects()
        assert not any(o is first for o in walked)
        assert not any(o is sim.hook("h").records for o in walked)
        # ... and requests after the freeze are walked until the next one.
        later: dict[str, object] = {"body": [FREEZE_EVERY]}
        sim.receive("h", later)
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
