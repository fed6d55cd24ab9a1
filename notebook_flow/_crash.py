"""Fault injection for the crash tests: ``NOTEBOOK_FLOW_CRASH_AT=<point>`` SIGKILLs the
process when it reaches that named point.

The points: the miss path's ``after_lock``, ``after_payload``, ``after_manifest``,
``before_release`` (:mod:`notebook_flow.tasks.call`, :mod:`notebook_flow.tasks.held`); a
transaction's ``after_stage`` and ``transaction_commit``
(:mod:`notebook_flow.transactions`); a group commit's ``group_manifest_<n>``,
``group_before_record``, ``group_after_record``, ``group_final_<n>`` and
``group_before_forget`` (:mod:`notebook_flow.storage.group`).
Read once at import; one string comparison per point when unset.
"""

from __future__ import annotations

import os

CRASH_AT = os.environ.get("NOTEBOOK_FLOW_CRASH_AT") or None


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the point the environment names."""
    if name == CRASH_AT:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
