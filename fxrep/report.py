"""The record of one ``fuse`` call: what was rewritten, what was left alone and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Applied:
    pattern: str
    summary: str
    origins: tuple[str, ...]
    details: dict = field(default_factory=dict)


@dataclass
class Skipped:
    pattern: str
    reason: str
    origins: tuple[str, ...]


@dataclass
class FuseReport:
    applied: list[Applied] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    sweeps: int = 0
    specialized: dict = field(default_factory=dict)  # forward arguments fixed while tracing: name -> value
    decisions: dict = field(default_factory=dict)  # widen decisions by shape key (fxrep.cost.Decision)
    cost_model: str = ""  # what decided them
    capture: str = ""  # how the model became a graph: torch.fx, or torch.export and why (fxrep.api)

    def decisions_as_dict(self) -> dict:
        """``decisions`` as plain data (JSON-ready), accepted back by ``fuse(..., decisions=...)``."""
        return {key: d.as_dict() for key, d in self.decisions.items()}

    def count(self, pattern: str) -> int:
        return sum(1 for a in self.applied if a.pattern == pattern)

    def patterns_applied(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.applied:
            out[a.pattern] = out.get(a.pattern, 0) + 1
        return out

    def _table(self, rows, headers) -> list[str]:
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
        line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
        return out

    def __str__(self) -> str:
        lines = ["fxrep fuse report"]
        if self.before:
            keys = [k for k in self.before if k in self.after]
            rows = [(k, _fmt(self.before[k]), _fmt(self.after[k])) for k in keys]
            lines += self._table(rows, ("", "before", "after"))
        if self.capture:
            lines.append(f"captured with {self.capture}")
        if self.specialized:
            fixed = ", ".join(f"{k}={v!r}" for k, v in self.specialized.items())
            lines.append(f"arguments fixed while tracing (another value raises): {fixed}")
        if self.decisions:
            lines.append(f"widening decided by {self.cost_model}:")
            lines += [f"  {'widen' if d.widen else 'apart'}  {key}: {d.describe()}"
                      for key, d in self.decisions.items()]
        lines.append("")
        lines.append(f"applied rewrites ({len(self.applied)}):")
        rows = []
        for a, n in _grouped(self.applied):
            d = a.details
            macs = f"{_fmt(d['macs_before'])} -> {_fmt(d['macs_after'])}" if "macs_before" in d else ""
            params = f"{_fmt(d['params_before'])} -> {_fmt(d['params_after'])}" if "params_after" in d else ""
            what = a.summary if n == 1 else f"{a.summary} (x{n})"
            rows.append((a.pattern, what, macs, params, _short(a.origins) if n == 1 else "..."))
        if rows:
            lines += ["  " + r
                      for r in self._table(rows, ("pattern", "what", "MACs/token", "params", "from"))]
        lines.append(f"skipped candidates ({len(self.skipped)}):")
        if self.skipped:
            rows = [(s.pattern, s.reason, _short(s.origins)) for s in self.skipped]
            lines += ["  " + r for r in self._table(rows, ("pattern", "reason", "at"))]
        return "\n".join(lines)


def _grouped(applied):
    """Rewrites without numbers (canonicalization) grouped by pattern and summary; others one row each."""
    out, index = [], {}
    for a in applied:
        if a.details:
            out.append([a, 1])
            continue
        key = (a.pattern, a.summary)
        if key in index:
            index[key][1] += 1
        else:
            index[key] = [a, 1]
            out.append(index[key])
    return [tuple(x) for x in out]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _short(origins, limit: int = 4) -> str:
    o = list(origins)
    return ", ".join(o[:limit]) + (f" (+{len(o) - limit})" if len(o) > limit else "")
