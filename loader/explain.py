"""The explain stream: the loader says each step in a plain sentence, what and why.

Part of the ``loader`` layer (imports ``loader.elf``, ``loader.plan``, ``loader.mmap``,
``loader.trace``). ``load(..., explain=hook)`` calls ``hook(Step)`` once per step, in pipeline
order (``PHASES``). Each sentence is built from the real plan and values of this load. A step's
``call_index`` is the index in the TracingMmap's ``calls`` of the first call it caused, so
``Explainer.interleave`` lines the steps up with the calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loader.elf import ElfImage, Segment
from loader.elfdefs import PF
from loader.mmap import MapFlags, ProtFlags
from loader.plan import LoadPlan, SegmentPlan
from loader.trace import Call

__all__ = ["PHASES", "SILENT", "Explainer", "Narrator", "NullNarrator", "Step"]

PHASES = ("parse", "plan", "reserve", "map", "relocate", "protect", "init", "undo")
"""The phases, in the order the pipeline goes through them ("undo" only after a failure)."""

_SYMBOL_SLOTS = ("R_X86_64_GLOB_DAT", "R_X86_64_JUMP_SLOT", "R_X86_64_64")


@dataclass(frozen=True, slots=True)
class Step:
    """One step: its ``phase`` (one of PHASES), the ``sentence``, and ``call_index``: the
    number of Mmap calls recorded before it (its own calls, if any, come from there on)."""

    phase: str
    sentence: str
    call_index: int


@dataclass
class Explainer:
    """A hook for ``load(..., explain=)`` that keeps every step in ``steps``."""

    steps: list[Step] = field(default_factory=list)

    def __call__(self, step: Step) -> None:
        """Keep ``step``."""
        self.steps.append(step)

    def interleave(self, calls: Sequence[Call]) -> list[tuple[Step | None, list[Call]]]:
        """Each step with the calls it caused (up to the next step's ``call_index``); calls
        made before the first step come first, paired with None."""
        out: list[tuple[Step | None, list[Call]]] = []
        first = self.steps[0].call_index if self.steps else len(calls)
        if first:
            out.append((None, list(calls[:first])))
        for i, step in enumerate(self.steps):
            end = self.steps[i + 1].call_index if i + 1 < len(self.steps) else len(calls)
            out.append((step, list(calls[step.call_index: max(end, step.call_index)])))
        return out

    def lines(self) -> list[str]:
        """The sentences, one per step, as ``phase: sentence``."""
        return [f"{s.phase}: {s.sentence}" for s in self.steps]


Sentences = Iterable[tuple[str, int | None]]
"""Sentences told after the fact: each with the call index it belongs to (None: now)."""


class Narrator:
    """What the pipeline talks to: ``say`` turns a sentence into a Step at the current call
    index of ``calls`` (the TracingMmap's list) and hands it to ``hook``.

    Sentences are built lazily: ``say(phase, make, *args)`` calls ``make(*args)`` only when
    someone listens, so a load nobody explains pays nothing for them (:data:`SILENT`)."""

    def __init__(self, hook: Callable[[Step], None], calls: list[Call]) -> None:
        self.hook, self.calls = hook, calls

    def say(self, phase: str, make: Callable[..., str], *args: Any) -> None:
        """Announce a step: the sentence ``make(*args)``, at the current call index."""
        self.hook(Step(phase, make(*args), len(self.calls)))

    def say_all(self, phase: str, make: Callable[..., Sentences], *args: Any) -> None:
        """Announce the steps ``make(*args)`` gives, each at its own call index."""
        for sentence, at in make(*args):
            self.hook(Step(phase, sentence, len(self.calls) if at is None else at))


class NullNarrator(Narrator):
    """The narrator of a load nobody explains: it builds no sentence and says nothing."""

    def __init__(self) -> None:
        super().__init__(lambda step: None, [])

    def say(self, phase: str, make: Callable[..., str], *args: Any) -> None:
        """Say nothing."""

    def say_all(self, phase: str, make: Callable[..., Sentences], *args: Any) -> None:
        """Say nothing."""


SILENT = NullNarrator()
"""The default narrator: silent."""


# ---------------------------------------------------------------------------------------------
# Sentences, from the plan and the values of one load


def _n(count: int) -> str:
    """A count with thousands separators: 1,234."""
    return f"{count:,}"


def _rel(plan: LoadPlan, vaddr: int) -> str:
    """A vaddr as an offset into the span: +0x3000."""
    return f"+{vaddr - plan.vmin:#x}"


def role(seg: Segment) -> str:
    """What a PT_LOAD holds, by its flags: code, data or read-only data."""
    if seg.p_flags & PF.X:
        return "code"
    return "data" if seg.p_flags & PF.W else "read-only data"


def parse_sentence(image: ElfImage, label: str, ndyn: int) -> str:
    """The header facts the loader checked."""
    kinds = [name for name, seg in (("PT_DYNAMIC", image.dynamic), ("PT_GNU_RELRO", image.relro),
                                    ("PT_TLS", image.tls)) if seg is not None]
    extra = f", {', '.join(kinds)}" if kinds else ""
    return (f"read {label.rsplit('/', 1)[-1]} ({image.size:#x} bytes): "
            f"ET_{image.e_type.name} x86-64, "
            f"{len(image.loads)} PT_LOAD{extra}, {ndyn} dynamic entries; the headers are "
            f"checked before any memory is touched")


def plan_sentence(plan: LoadPlan) -> str:
    """The span and alignment the plan chose."""
    where = f"exactly at {plan.vmin:#x} (ET_EXEC)" if plan.fixed else "anywhere"
    return (f"span [{plan.vmin:#x}, {plan.vmax:#x}) = {plan.span_length:#x} bytes, "
            f"{where}, page {plan.page_size:#x}, base aligned to {plan.align:#x} "
            f"(the largest p_align)")


def reserve_sentence(plan: LoadPlan, base: int | None) -> str:
    """Why one PROT_NONE reservation of the whole span comes first."""
    text = (f"reserve {plan.span_length:#x} bytes PROT_NONE: the whole span, so segments keep "
            f"their distances and nothing else lands between them")
    if plan.fixed:
        return text + f" (at {plan.vmin:#x}: an ET_EXEC loads at its own address)"
    if base is not None:
        return text + f" (at {base:#x}, as asked)"
    if plan.align > plan.page_size:
        return text + (f" (over-reserve {plan.align - plan.page_size:#x} more and unmap the "
                       f"ends, so the base is aligned to {plan.align:#x})")
    return text


def map_sentence(plan: LoadPlan, sp: SegmentPlan, seg: Segment) -> str:
    """Map one PT_LOAD's file pages."""
    return (f"map {sp.map_end - sp.start:#x} bytes {sp.prot.rwx} from file offset "
            f"{sp.offset:#x} at {_rel(plan, sp.start)}: PT_LOAD {sp.index} ({role(seg)})")


def copy_sentence(sp: SegmentPlan) -> str:
    """The backend answered need_copy: bytes are copied, then the protection set."""
    return (f"copy {sp.map_end - sp.start:#x} bytes of PT_LOAD {sp.index} from the file and "
            f"mprotect them {sp.prot.rwx}: the backend cannot map files (need_copy)")


def zero_sentence(plan: LoadPlan, sp: SegmentPlan) -> str:
    """Clear the tail of the last file page."""
    text = (f"zero {sp.zero_end - sp.zero_start:#x} bytes at {_rel(plan, sp.zero_start)}: the "
            f"tail of the last file page belongs to .bss (PT_LOAD {sp.index})")
    if not sp.prot & ProtFlags.PROT_WRITE:
        text += f" (the page is made writable for it, then {sp.prot.rwx} again)"
    return text


def anon_sentence(plan: LoadPlan, sp: SegmentPlan) -> str:
    """Map the rest of .bss anonymously."""
    return (f"map {sp.anon_end - sp.anon_start:#x} bytes anonymous {sp.prot.rwx} at "
            f"{_rel(plan, sp.anon_start)}: the rest of .bss (PT_LOAD {sp.index}), zero pages "
            f"that take no room in the file")


def hole_sentence(plan: LoadPlan, lo: int, hi: int) -> str:
    """A gap between segments stays inaccessible."""
    return (f"mprotect [{_rel(plan, lo)}, {_rel(plan, hi)}) PROT_NONE: no PT_LOAD covers it, "
            f"so it stays a guard between segments")


def relocation_sentences(by_type: dict[str, int], extern: int, unresolved: int,
                         resolver: str) -> list[tuple[str, str]]:
    """What relocation did, from the outcome's counts per type: ("bind", ...) for the
    resolver, ("apply", ...) for the one scatter, ("rare", ...) for the other kinds (in the
    same bulk pass; IFUNC-chosen values in a second write after their resolvers)."""
    out = []
    relative = by_type.get("R_X86_64_RELATIVE", 0)
    slots = {k: v for k, v in by_type.items() if k in _SYMBOL_SLOTS and v}
    nslots = sum(slots.values())
    if slots:
        names = "/".join(k.removeprefix("R_X86_64_") for k in _SYMBOL_SLOTS if k in slots)
        text = f"bind {_n(nslots)} {names} slot{'s' if nslots != 1 else ''} through the " \
            f"resolver ({resolver})"
        if extern:
            text += f": {_n(extern)} import{'s go' if extern != 1 else ' goes'} to stubs in " \
                "an extern mapping"
        if unresolved:
            text += f"; {_n(unresolved)} unresolved"
        out.append(("bind", text))
    if relative or slots:
        out.append(("apply", f"apply {_n(relative)} RELATIVE relocations (load bias + addend)"
                    + (f" and the {_n(nslots)} symbol slots" if slots else "")
                    + f" as one scatter of {_n(relative + nslots)} words"))
    rare = {k: v for k, v in by_type.items()
            if v and k != "R_X86_64_RELATIVE" and k not in _SYMBOL_SLOTS}
    if rare:
        kinds = ", ".join(f"{k.removeprefix('R_X86_64_')} {_n(v)}" for k, v in rare.items())
        out.append(("rare", f"apply {_n(sum(rare.values()))} other relocations in the same "
                    f"bulk pass (each width cut into word pieces, in table order): {kinds}"))
    if not out:
        out.append(("apply", "no relocations to apply"))
    return out


def textrel_sentence(open_: bool) -> str:
    """TEXTREL: read-only segments opened for relocation, then closed."""
    if open_:
        return "TEXTREL: make the read-only segments writable, since relocations patch them"
    return "TEXTREL: give the read-only segments their own protection back"


def relro_sentence(plan: LoadPlan, seg: Segment | None) -> str:
    """Seal RELRO, with the header's own range beside the rounded one."""
    assert plan.relro is not None
    lo, hi = plan.relro
    text = f"RELRO: mprotect [{_rel(plan, lo)}, {_rel(plan, hi)}) r--: "
    if seg is not None:
        text += f"PT_GNU_RELRO is [{seg.p_vaddr:#x}, {seg.end:#x}); "
    return text + "glibc rounds both ends down, so the page holding the first writable data " \
        "stays writable"


def init_sentence(single: bool, array_count: int, ran: bool, why_not: str) -> str:
    """Run or record DT_INIT and DT_INIT_ARRAY."""
    parts = (["DT_INIT"] if single else []) + (["DT_INIT_ARRAY"] if array_count else [])
    if not parts:
        return "no DT_INIT or DT_INIT_ARRAY: nothing to run"
    total = array_count + (1 if single else 0)
    what = f"{' + '.join(parts)} ({total} function{'s' if total != 1 else ''})"
    return f"run {what}" if ran else f"record {what} ({why_not}: not run)"


def undo_sentence(error: BaseException) -> str:
    """After a failure everything mapped so far is unmapped."""
    return f"undo: unmap the span (and any extern mapping) after {type(error).__name__}: {error}"


def format_call(call: Call | Any) -> str:
    """One recorded call as a line: ``op(arg=value, ...) -> result`` or ``-> errno N``."""
    parts = []
    for name, value in call.args:
        if name == "prot" and isinstance(value, int):
            parts.append(f"prot={ProtFlags(value).rwx}")
        elif name == "flags" and isinstance(value, int):
            parts.append("flags=" + "|".join(str(f.name) for f in MapFlags(value)))
        elif isinstance(value, int) and not isinstance(value, bool) and name in (
                "addr", "length", "offset", "end", "result"):
            parts.append(f"{name}={value:#x}")
        else:
            parts.append(f"{name}={value}")
    if call.errno is not None:
        import errno as errno_mod
        tail = f"-> errno {call.errno} ({errno_mod.errorcode.get(call.errno, '?')})"
    elif isinstance(call.result, int):
        tail = f"-> {call.result:#x}"
    else:
        tail = f"-> {call.result}"
    return f"{call.op}({', '.join(parts)}) {tail}"


def phases_in_order(steps: Iterable[Step]) -> bool:
    """True when the steps' phases never go back in PHASES order."""
    ranks = [PHASES.index(s.phase) for s in steps]
    return ranks == sorted(ranks)
