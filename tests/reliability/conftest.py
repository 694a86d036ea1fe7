"""The file limit the reliability tests need.

The storms hold 5,000 client sockets and 5,000 server sockets in one process
(the frozen-reader test 2,200), more than a default soft limit of 1,024
descriptors allows.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

#: Descriptors the storm tests need: 5,000 clients, 5,000 server ends, and room.
FD_LIMIT = 20_000


@pytest.fixture
def fd_limit() -> Iterator[int]:
    """Raise RLIMIT_NOFILE to :data:`FD_LIMIT` for one test (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= FD_LIMIT:
        yield soft
        return
    new_hard = hard if hard == resource.RLIM_INFINITY else max(FD_LIMIT, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, new_hard))
    except (ValueError, OSError) as exc:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {FD_LIMIT} (hard limit {hard}): {exc}")
    try:
        yield FD_LIMIT
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
