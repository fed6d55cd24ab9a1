"""Why a call would hit or miss: :class:`Explanation` and the reasons behind a miss."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why a call would hit or miss: ``task.explain(*args, **kwargs)``."""

    task: str
    key: str | None
    status: str  # "hit" | "miss" | "expired" | "uncached" | "corrupt"
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        head = f"task `{self.task}`: {self.status}"
        return head + "".join(f"\n  - {r}" for r in self.reasons)

    def _repr_markdown_(self) -> str:
        return f"**task `{self.task}`: {self.status}**\n\n" + "\n".join(
            f"- {r}" for r in self.reasons
        )


# The log line on a miss looks up the latest entry in the run history, waiting at most this
# long: another process may hold the index (a long write, a paused kernel), and a log line
# must never hold up a computation.
EXPLAIN_WAIT = 1.0
BUSY_REASON = "reason not looked up: the run history is busy (another process holds it)"


def diff_components(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Human reasons for the difference between two component maps."""
    if old is None:
        return ["no earlier result of this task was found"]
    reasons = [
        f"{label} changed" for label in sorted(new) if label in old and old[label] != new[label]
    ]
    reasons += [f"{label} is new" for label in sorted(new) if label not in old]
    reasons += [f"{label} is no longer used" for label in sorted(old) if label not in new]
    return reasons or ["the cache key format or the task's namespace changed"]


def _expired_reason(manifest: Manifest) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.expires_at or 0))
    return f"expired: the stored result expired at {when}"
