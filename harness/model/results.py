"""What a scenario produced, as the host reads it: the agent's answer (outcome, trace events, reports, the
result block) with named accessors and a readable trace.  Pure: built from the channel's JSON or a saved
``traces/NNN-name.jsonl``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import protocol as P
from ..errors import GuestError

RESULT_BLOCK_SIZE = P.RESULT_BLOCK_SIZE


@dataclass
class ScenarioResult:
    """The agent's answer for one scenario, with helpers for assertions."""
    raw: dict
    payload: object = None          # harness.images.payloads.Payload, for symbolizing PCs
    console: str = ""               # console output printed while the scenario ran
    trace_path: Path | None = None

    @classmethod
    def from_trace_file(cls, path: Path, payload=None) -> ScenarioResult:
        """Load a saved ``traces/NNN-name.jsonl`` (events, then a ``summary`` line) for offline diagnosis."""
        events, raw = [], {}
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise GuestError(f"{path}:{n}: not a trace record: {e}") from None
                if rec.get("kind") == "summary":
                    raw = {k: v for k, v in rec.items() if k != "kind"}
                else:
                    events.append(rec)
        raw["events"] = events
        return cls(raw=raw, payload=payload, trace_path=Path(path))

    @property
    def outcome(self) -> str:
        return self.raw.get("outcome")

    @property
    def events(self) -> list[dict]:
        return self.raw.get("events", [])

    @property
    def hypercalls(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "hypercall"]

    @property
    def reports(self) -> dict[int, int]:
        return {e["slot"]: e["value"] for e in self.events if e["kind"] == "report"}

    def reports_of(self, vcpu: int) -> dict[int, int]:
        return {e["slot"]: e["value"] for e in self.events if e["kind"] == "report" and e.get("vcpu") == vcpu}

    # ---- what the agent reported, by name (the wire format stays the agent's JSON: harness/guest/runner.py) ----
    @property
    def name(self) -> str:
        return self.raw.get("name", "")

    @property
    def exit_code(self) -> int | None:
        """The payload's DONE value (None: it never wrote DONE)."""
        return self.raw.get("exit_code")

    @property
    def errors(self) -> list[str]:
        return self.raw.get("errors", [])

    @property
    def vcpus(self) -> list[dict]:
        """Each vCPU's final state: {index, pc, pstate, x: [x0..x30]}."""
        return self.raw.get("vcpus", [])

    @property
    def late_filters(self) -> list[dict]:
        """Filter ranges installed after the first KVM_RUN, each with the errno KVM answered."""
        return self.raw.get("late_filters", [])

    @property
    def probes(self) -> list[dict]:
        """VM-fd device-attribute probes, each with its errno."""
        return self.raw.get("probes", [])

    @property
    def migrations(self) -> list[dict]:
        """Save/restore cycles the VMM did during the run (harness/guest/migrate.py)."""
        return self.raw.get("migrations", [])

    @property
    def exits(self) -> int | None:
        """KVM_RUN exits the run took."""
        return self.raw.get("exits")

    @property
    def trace_dropped(self) -> int:
        """Trace records dropped beyond the trace limit."""
        return self.raw.get("trace_dropped", 0)

    @property
    def livelock(self) -> dict | None:
        """The progress watchdog's finding when the outcome is ``livelock`` (harness/guest/runner.py): vcpu, pc,
        insn (``smc #0``, ``b .`` ...), word, why, kicks, still_s, window_s, samples, message."""
        return self.raw.get("livelock")

    def livelock_message(self) -> str | None:
        """``vcpu0 livelock at pc=spin_loop (b .)``: the agent's message with the PC symbolized, and why."""
        ll = self.livelock
        if not ll:
            return None
        return (f"vcpu{ll['vcpu']} livelock at pc={self.symbol(ll['pc'])} ({ll['insn']}): {ll['why']}; PC unmoved and "
                f"no exit across {ll['kicks']} watchdog kicks in {ll['still_s']:g} s (window {ll['window_s']:g} s)")

    @property
    def filters(self) -> list[dict]:
        return self.raw.get("filters", [])

    @property
    def result_block(self) -> bytes:
        data = P.unb64(self.raw.get("result_block", ""))
        return data + bytes(max(0, RESULT_BLOCK_SIZE - len(data)))   # the agent strips trailing zeros

    def symbol(self, addr: int) -> str:
        if self.payload is not None and hasattr(self.payload, "symbolize"):
            return self.payload.symbolize(addr)
        return f"{addr:#x}"

    def format_trace(self) -> str:
        """The handler trace, one line per record, PCs named by payload symbols."""
        lines = []
        for e in self.events:
            d = dict(e)
            t, kind, vcpu = d.pop("t"), d.pop("kind"), d.pop("vcpu", "-")
            if "pc" in d:
                d["pc"] = self.symbol(d["pc"])
            if kind == "hypercall":
                args = d.pop("args")
                d["x0..x3"] = " ".join(f"{a:#x}" for a in args[:4])
                d["nr"] = f"{d['nr']:#x}"
                d["pstate"] = f"{d['pstate']:#x}"
                if d.get("reply") is not None:
                    d["reply"] = " ".join(f"{a:#x}" for a in d["reply"])
            body = " ".join(f"{k}={v}" for k, v in d.items())
            lines.append(f"{t:9.6f} vcpu{vcpu} {kind:<12} {body}")
        return "\n".join(lines)

    def describe(self) -> str:
        out = [f"scenario {self.name}: outcome={self.outcome} exit_code={self.exit_code}"]
        if self.livelock:
            out.append(self.livelock_message())
        out += ["handler trace:", self.format_trace() or "  (empty)"]
        if self.errors:
            out.append("errors: " + "; ".join(self.errors))
        for v in self.vcpus:
            out.append(f"vcpu{v['index']}: pc={self.symbol(v['pc'])} pstate={v['pstate']:#x} "
                       f"x0..x3={' '.join(hex(x) for x in v['x'][:4])}")
        if self.trace_path:
            out.append(f"trace: {self.trace_path}")
        return "\n".join(out)
