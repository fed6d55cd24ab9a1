"""Run every benchmark (or some): prints a table of ratios against peers, writes JSON.

    python benchmarks/run.py                 # all of them
    python benchmarks/run.py tasks hashing   # only bench_tasks.py and bench_hashing.py

Each ``bench_*.py`` module exposes ``run() -> list[dict]`` with rows
``{"benchmark", "metric", "ours", "peers": {name: value}, "target", "ok"}``; peers are
measured in the same run on the same machine, so ratios mean something on a noisy box.
"""

from __future__ import annotations

import compileall
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 100_000:
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def main(argv: list[str]) -> int:
    # Byte-compile the package, as a regular install does (with PYTHONDONTWRITEBYTECODE
    # set, each kernel and subprocess would otherwise recompile it: ~85 ms apiece).
    compileall.compile_dir(str(HERE.parent / "notebook_flow"), quiet=1)
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    wanted = [a for a in argv if not a.startswith("-")]
    if wanted:
        names = [n for n in names if n.removeprefix("bench_") in wanted or n in wanted]
    rows: list[dict] = []
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
            got = module.run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for row in got:
            row["module"] = name
        rows.extend(got)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)

    header = ("benchmark", "metric", "ours", "peers", "target", "ok")
    table = []
    for r in rows:
        peers = ", ".join(f"{k} {_fmt(v)}" for k, v in r.get("peers", {}).items())
        table.append(
            (
                r["benchmark"],
                r["metric"],
                _fmt(r["ours"]),
                peers,
                r.get("target", ""),
                "-" if r.get("ok") is None else "yes" if r["ok"] else "NO",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(str(x).ljust(w) for x, w in zip(t, widths)))

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
        },
        "rows": rows,
        "failed": failed,
    }
    (out / "latest.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {out / 'latest.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
