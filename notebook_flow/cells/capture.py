"""Recording what a running cell shows, and showing it again on a hit.

:class:`_Capture` tees the streams, display publisher and display hook of the shell
while a cell computes; :func:`replay` shows the recorded outputs of a cached cell.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Replayed", "replay"]


# --------------------------------------------------------------------------- capture


@dataclasses.dataclass
class _Capture:
    """Records what a running cell shows (streams, display data, the last expression) while
    letting it through unchanged. Installed per cell, removed right after."""

    shell: Any
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    _clear_pending: bool = False
    _in_result: bool = False  # a terminal displayhook prints the result to stdout

    def _add(self, output: dict[str, Any]) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._clear_pending = False
        last = self.outputs[-1] if self.outputs else None
        if (
            output["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == output["name"]
        ):
            last["text"] += output["text"]
        else:
            self.outputs.append(output)

    def _patch(self, obj: Any, attr: str, new: Any) -> bool:
        return _patch_instance(obj, attr, new, self._undo)

    def _tee_stream(self, name: str) -> None:
        stream = getattr(sys, name)
        write = stream.write

        def tee(text: str) -> int:
            if isinstance(text, str) and text and not self._in_result:
                self._add({"output_type": "stream", "name": name, "text": text})
            return write(text)  # type: ignore[no-any-return]

        if not self._patch(stream, "write", tee):
            # A C-level stream (a terminal's TextIOWrapper): swap the object instead.
            setattr(sys, name, _Tee(stream, tee))
            self._undo.append(lambda: setattr(sys, name, stream))

    def __enter__(self) -> _Capture:
        shell = self.shell
        pub, hook = shell.display_pub, shell.displayhook
        publish, clear, write_data = pub.publish, pub.clear_output, hook.write_format_data

        def tee_publish(
            data: dict[str, Any], metadata: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            transient = kwargs.get("transient") or {}
            display_id = transient.get("display_id") if isinstance(transient, dict) else None
            if kwargs.get("update") and display_id:
                for out in self.outputs:
                    if out.get("display_id") == display_id:
                        out["data"], out["metadata"] = dict(data), dict(metadata or {})
            else:
                self._add({
                    "output_type": "display_data",
                    "data": dict(data),
                    "metadata": dict(metadata or {}),
                    "display_id": display_id,
                })  # fmt: skip
            return publish(data, metadata, *args, **kwargs)

        def tee_clear(wait: bool = False) -> Any:
            if wait:
                self._clear_pending = True
            else:
                self.outputs.clear()
            return clear(wait)

        def tee_result(format_dict: dict[str, Any], md_dict: Any = None) -> Any:
            self._add({
                "output_type": "execute_result",
                "data": dict(format_dict),
                "metadata": dict(md_dict or {}),
            })  # fmt: skip
            self._in_result = True
            try:
                return write_data(format_dict, md_dict)
            finally:
                self._in_result = False

        self._patch(pub, "publish", tee_publish)
        self._patch(pub, "clear_output", tee_clear)
        self._patch(hook, "write_format_data", tee_result)
        self._tee_stream("stdout")
        self._tee_stream("stderr")
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()
        for out in self.outputs:
            out.pop("display_id", None)


def _patch_instance(obj: Any, attr: str, new: Any, undo: list[Callable[[], None]]) -> bool:
    """Shadow ``obj.attr`` with an instance attribute; ``undo`` gets how to put it back."""
    own = getattr(obj, "__dict__", None)
    if own is None:
        return False
    missing = object()
    previous = own.get(attr, missing)
    try:
        setattr(obj, attr, new)
    except (AttributeError, TypeError):
        return False

    def restore() -> None:
        if previous is missing:
            own.pop(attr, None)
        else:
            own[attr] = previous

    undo.append(restore)
    return True


class _Tee:
    """A stand-in stream that records writes and delegates everything else."""

    def __init__(self, stream: Any, write: Callable[[str], int]) -> None:
        self._stream = stream
        self.write = write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Replayed:
    """The last expression's output of a cached cell, displayed again as ``Out[n]``.

    On a hit ``_`` and ``Out[n]`` hold this stand-in (its display), not the value itself:
    the value is not stored unless the cell assigns it to a variable.
    """

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._data, self._metadata = data, metadata

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return dict(self._data), dict(self._metadata)

    def __repr__(self) -> str:
        return str(self._data.get("text/plain", "<cached output>"))


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def replay(outputs: list[dict[str, Any]], shell: Any) -> None:
    """Show recorded outputs again, in their order: streams are written, display data
    published, and the last expression goes through the display hook (``Out[n]``)."""
    for out in outputs:
        kind = out["output_type"]
        if kind == "stream":
            stream = getattr(sys, out["name"], sys.stdout)
            stream.write(out["text"])
            stream.flush()
        else:
            # A widget's view points at a model of the kernel that made it: show its text.
            data = {k: v for k, v in out["data"].items() if k != _WIDGET_VIEW}
            if kind == "execute_result":
                shell.displayhook(Replayed(data, out["metadata"]))
            else:
                shell.display_pub.publish(data=data, metadata=dict(out["metadata"]))
