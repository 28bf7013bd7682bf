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

import numpy as np

from loader.elf import ElfImage, Segment
from loader.elfdefs import ET, PF, R_X86_64, SHN, STB, st_bind, versym_index
from loader.mmap import MapFlags, ProtFlags
from loader.plan import LoadPlan, SegmentPlan
from loader.tables import DynamicTables
from loader.trace import Call

__all__ = ["PHASES", "RELOCATION_MEANINGS", "SILENT", "Bindings", "Explainer", "Narrator",
           "NullNarrator", "Step", "bindings"]

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
    kinds = [name for name, seg in (("PT_INTERP", image.interp), ("PT_DYNAMIC", image.dynamic),
                                    ("PT_GNU_RELRO", image.relro), ("PT_TLS", image.tls))
             if seg is not None]
    extra = f", {', '.join(kinds)}" if kinds else ""
    return (f"read {label.rsplit('/', 1)[-1]} ({image.size:#x} bytes): "
            f"ET_{image.e_type.name} x86-64, "
            f"{len(image.loads)} PT_LOAD{extra}, {ndyn} dynamic entries; the headers are "
            f"checked before any memory is touched")


def kind_sentence(image: ElfImage) -> str:
    """What kind of object this is (shared object, PIE, ET_EXEC), what that means for where
    it may load, and its entry point."""
    entry = f"e_entry = {image.e_entry:#x}"
    if image.e_type == ET.EXEC:
        return (f"ET_EXEC: a position-dependent executable: the linker fixed its addresses, so "
                f"it loads exactly at its p_vaddr and its load bias is 0; {entry} is the "
                f"address of its first instruction (_start)")
    if image.interp is not None:
        return (f"ET_DYN with PT_INTERP: a position-independent executable (PIE), or a "
                f"library that can also be run (as libc.so.6); like a "
                f"shared object it loads at any page-aligned base, so its load bias is that "
                f"base minus its lowest p_vaddr (an ET_EXEC's is always 0); {entry}: its "
                f"first instruction (_start) is at load bias + {image.e_entry:#x}")
    start = "no entry point" if not image.e_entry else \
        "nobody jumps there when it is loaded as a library"
    return (f"ET_DYN without PT_INTERP: a shared object; it loads at any page-aligned base "
            f"(its code is position-independent); {entry} ({start}: a library starts through "
            f"its DT_INIT and DT_INIT_ARRAY functions)")


INTERP_SHOWN = 256
"""At most this many bytes of a PT_INTERP path are read to show it."""


def interp_path(image: ElfImage) -> str:
    """The program interpreter's path PT_INTERP names (at most INTERP_SHOWN bytes read, and
    only from inside the file), or a note saying why it cannot be shown."""
    seg = image.interp
    if seg is None:
        return ""
    if seg.p_offset >= image.size:
        return f"(its path lies outside the file, at offset {seg.p_offset:#x})"
    length = min(seg.p_filesz, INTERP_SHOWN, image.size - seg.p_offset)
    raw = bytes(image.read(seg.p_offset, length)).split(b"\0", 1)[0]
    return raw.decode("utf-8", "backslashreplace")


def interp_sentence(image: ElfImage) -> str:
    """PT_INTERP: who would start this program, and that this loader does not."""
    return (f"PT_INTERP names the program interpreter {interp_path(image)}: the dynamic "
            f"linker the kernel maps beside an executable and runs first (it loads the "
            f"DT_NEEDED libraries, relocates, then jumps to e_entry). This loader, like "
            f"dlopen, maps and relocates the file itself: it neither runs the interpreter "
            f"nor jumps to e_entry")


def parse_sentences(image: ElfImage, label: str, ndyn: int) -> Sentences:
    """The parse step: the header facts, the kind of object, its interpreter if any."""
    out = [(parse_sentence(image, label, ndyn), None), (kind_sentence(image), None)]
    if image.interp is not None:
        out.append((interp_sentence(image), None))
    return out


def plan_sentence(plan: LoadPlan) -> str:
    """The span and alignment the plan chose."""
    where = f"exactly at {plan.vmin:#x} (ET_EXEC)" if plan.fixed else "anywhere"
    return (f"span [{plan.vmin:#x}, {plan.vmax:#x}) = {plan.span_length:#x} bytes, "
            f"{where}, page {plan.page_size:#x}, base aligned to {plan.align:#x} "
            f"(the largest p_align)")


def bias_sentence(plan: LoadPlan) -> str:
    """The load bias and ASLR, defined before any sentence uses them."""
    if plan.fixed:
        return ("load bias: where the span lands minus its lowest p_vaddr; an ET_EXEC lands "
                "at its own p_vaddr, so its bias is 0 and its addresses are used as they are "
                "(no ASLR for it: it cannot move)")
    return (f"load bias: where the span lands minus its lowest p_vaddr ({plan.vmin:#x}); "
            f"every address in the file (symbols, relocation targets, e_entry) is a p_vaddr "
            f"to which the bias is added. ASLR (address space layout randomisation): the "
            f"kernel picks a random base for each process, so the bias changes from run to "
            f"run; the simulator places top-down from the same address every time (--base "
            f"chooses it on both backends)")


def plan_sentences(plan: LoadPlan) -> Sentences:
    """The plan step: the span, then the load bias defined."""
    return [(plan_sentence(plan), None), (bias_sentence(plan), None)]


def reserve_sentence(plan: LoadPlan, base: int | None, use_file: bool = True) -> str:
    """Why one reservation of the whole span comes first, and what ``use_file`` chooses."""
    if use_file:
        text = (f"reserve {plan.span_length:#x} bytes PROT_NONE: the whole span, so segments "
                f"keep their distances and nothing else lands between them "
                f"(mmap_reserve(use_file=True): the segments are mapped from the file over it)")
    else:
        text = (f"reserve {plan.span_length:#x} bytes write-only (-w-p): the whole span, so "
                f"segments keep their distances (mmap_reserve(use_file=False): there is no "
                f"file to map, so the segments' bytes are written into it; the pages no "
                f"segment covers stay -w-p until they are made PROT_NONE)")
    if plan.fixed:
        return text + f" (at {plan.vmin:#x}: an ET_EXEC loads at its own address)"
    if base is not None:
        return text + f" (at {base:#x}, as asked)"
    if plan.align > plan.page_size:
        return text + (f" (over-reserve {plan.align - plan.page_size:#x} more and unmap the "
                       f"ends, so the base is aligned to {plan.align:#x})")
    return text


def _shared_page(plan: LoadPlan, sp: SegmentPlan) -> SegmentPlan | None:
    """The PT_LOAD just before ``sp`` when its last file page is ``sp``'s first, else None
    (one look, not a scan: a file of thousands of segments is told in linear time)."""
    at = sp.index - 1
    if at < 0 or at >= len(plan.segments) or sp.map_end <= sp.start:
        return None
    prev = plan.segments[at]
    if prev.index != at or prev.map_end <= prev.start:
        return None
    return prev if prev.offset + (prev.map_end - prev.start) > sp.offset else None


def map_sentence(plan: LoadPlan, sp: SegmentPlan, seg: Segment) -> str:
    """Map one PT_LOAD's file pages: why the file page fits the memory page (p_offset and
    p_vaddr agree modulo the alignment), and a file page two PT_LOADs share."""
    text = (f"map {sp.map_end - sp.start:#x} bytes {sp.prot.rwx} from file offset "
            f"{sp.offset:#x} at {_rel(plan, sp.start)}: PT_LOAD {sp.index} ({role(seg)}); "
            f"p_offset {seg.p_offset:#x} ≡ p_vaddr {seg.p_vaddr:#x} (mod the page size "
            f"{plan.page_size:#x}: both {seg.p_vaddr % plan.page_size:#x} into a page, as ELF "
            f"requires), so whole file pages become whole memory pages: mapped, not copied")
    prev = _shared_page(plan, sp)
    if prev is not None:
        text += (f"; file page {sp.offset:#x} is also the last page PT_LOAD {prev.index} "
                 f"maps: two PT_LOADs share it, so it is mapped twice, at two addresses with "
                 f"two protections (private: writing one copies it, the other keeps the file's "
                 f"bytes)")
    return text


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


RELOCATION_MEANINGS: dict[str, str] = {
    "R_X86_64_NONE": "nothing to do (a placeholder entry)",
    "R_X86_64_64": "S + A: a symbol's address plus an addend, in a 64-bit word (a pointer "
                   "to a symbol in data)",
    "R_X86_64_PC32": "S + A - P: a 32-bit distance from the place to a symbol (PC-relative)",
    "R_X86_64_COPY": "copy a data object's initial bytes (st_size of them) from the library "
                     "that defines it into this executable's own .bss: the executable was "
                     "linked against a fixed address for it, so everyone, the library "
                     "included, uses that copy",
    "R_X86_64_GLOB_DAT": "S: a symbol's address in a GOT entry (how position-independent "
                         "code reaches global data and function pointers)",
    "R_X86_64_JUMP_SLOT": "S: a function's address in its GOT slot; a call goes through the "
                          "PLT, which jumps to what the slot holds (bound now, as RTLD_NOW "
                          "and -z now do, never lazily)",
    "R_X86_64_RELATIVE": "B + A: the load bias plus an addend, a pointer into this object "
                         "itself; it needs no symbol",
    "R_X86_64_32": "S + A in 32 bits, zero-extended (it must fit)",
    "R_X86_64_32S": "S + A in 32 bits, sign-extended (it must fit)",
    "R_X86_64_DTPMOD64": "the module ID of the object defining a thread-local (TLS) "
                         "variable: with DTPOFF64, what __tls_get_addr needs to find it",
    "R_X86_64_DTPOFF64": "S + A: a TLS variable's offset inside its module's TLS block",
    "R_X86_64_TPOFF64": "S + A - the TLS offset: a TLS variable's distance from the thread "
                        "pointer (%fs), in static TLS",
    "R_X86_64_PC64": "S + A - P in 64 bits",
    "R_X86_64_TLSDESC": "a TLS descriptor: a (function, argument) pair the code calls to find "
                        "a TLS variable (here: in static TLS)",
    "R_X86_64_IRELATIVE": "IFUNC: call the resolver at B + A, which picks an implementation "
                          "for this CPU (an AVX2 memcpy, say), and store what it returns; "
                          "only where code can run (the host): the simulator records the "
                          "resolver's address",
    "R_X86_64_RELATIVE64": "B + A in 64 bits (as RELATIVE)",
}
"""One line per x86-64 relocation type: what the loader writes at the place. S is the
symbol's address, A the addend, B the load bias, P the place (the address written)."""


@dataclass(frozen=True, slots=True)
class Bindings:
    """Who the symbol slots (GLOB_DAT, JUMP_SLOT, R_X86_64_64) name: ``own`` a symbol this
    object defines, ``imported`` one it does not; ``imports`` the distinct symbols looked up
    outside the object (undefined ones any relocation names, and the sources of COPY
    relocations), ``weak`` of them weak, ``versioned`` of them with a version, ``example``
    one such ``name@VERSION``."""

    own: int = 0
    imported: int = 0
    imports: int = 0
    weak: int = 0
    versioned: int = 0
    example: str = ""


_EXAMPLES = 64
"""At most this many versioned imports are named to pick an example (memcpy if there)."""
_SLOT_TYPES = np.array([int(R_X86_64.GLOB_DAT), int(R_X86_64.JUMP_SLOT), int(R_X86_64.R64)])


def bindings(tables: DynamicTables) -> Bindings:
    """Count, over every relocation table, who the symbol slots name (:class:`Bindings`)."""
    if not tables.relocs or not len(tables.symtab):
        return Bindings()
    types = np.concatenate([t.r_type for t in tables.relocs]).astype(np.int64)
    syms = np.concatenate([t.r_sym for t in tables.relocs]).astype(np.int64)
    undefined = tables.symtab["st_shndx"] == int(SHN.UNDEF)
    slot = np.isin(types, _SLOT_TYPES) & (syms != 0)
    own = int(np.count_nonzero(slot & ~undefined[syms]))
    imported = int(np.count_nonzero(slot & undefined[syms]))
    copied = types == int(R_X86_64.COPY)    # a COPY's source is looked up outside, too
    used = np.unique(syms[(syms != 0) & (undefined[syms] | copied)])
    weak = int(np.count_nonzero(st_bind(tables.symtab["st_info"][used]) == int(STB.WEAK)))
    versioned, example = 0, ""
    if tables.versym is not None and len(used):
        index = versym_index(tables.versym[used]).astype(np.int64)
        named = np.flatnonzero(index > 1)
        versioned = len(named)
        labels = [f"{tables.name(int(tables.symtab[int(used[k])]['st_name']))}@"
                  f"{tables.versions.get(int(index[k]), '?')}" for k in named[:_EXAMPLES]]
        example = next((x for x in labels if x.startswith("memcpy@")), labels[0] if labels
                       else "")
    return Bindings(own, imported, len(used), weak, versioned, example)


def _where_imports_go(extern: int, resolver: str) -> str:
    """Where the resolver sent the imports: stubs, this process, or its own chain."""
    if extern:
        each = " each" if extern != 1 else ""
        return (f"{resolver} gave {_n(extern)} a stub{each} in an extern mapping (16 bytes of "
                f"int3 for a function, zeros for data: the simulator has no libc to bind them "
                f"to)")
    if resolver == "HostResolver":
        return (f"{resolver} looked them up in this process (dlsym/dlvsym, in the libraries "
                f"Python has loaded)")
    return f"{resolver}'s chain bound them"


def bind_sentence(nslots: int, names: str, who: Bindings, extern: int, unresolved: int,
                  resolver: str, obj_name: str) -> str:
    """The binding step, counting both kinds of slot: the object's own definitions (reached
    through its own PLT/GOT) and the imports; then where the imported symbols went."""
    text = (f"bind {_n(nslots)} {names} slot{'s' if nslots != 1 else ''} through the "
            f"resolver ({resolver})")
    parts = []
    owner = "the object" if obj_name.startswith("<") else obj_name   # "<bytes>": no file name
    if who.own:
        parts.append(f"{_n(who.own)} name {owner}'s own definitions (it reaches even its own "
                     f"exported functions and data through its PLT and GOT, so another object "
                     f"could interpose them; here they bind to load bias + st_value)")
    if who.imported:
        parts.append(f"{_n(who.imported)} name imports (symbols it uses but does not define)")
    if parts:
        text += ": " + ", ".join(parts)
    fates = []
    if who.weak:
        fates.append(f"{_n(who.weak)} weak (0 when nobody defines them)")
    if extern or who.imports:
        fates.append(_where_imports_go(extern, resolver))
    if unresolved:
        fates.append(f"{_n(unresolved)} unresolved (written as 0)")
    if who.imports:
        return text + f". Its {_n(who.imports)} imported symbols (any relocation's, COPY " \
            "sources included): " \
            + "; ".join(fates)
    return text + (": " + "; ".join(fates) if fates else "")


def version_sentence(who: Bindings) -> str:
    """Symbol versions: what they are, where they come from, that binding matches them."""
    name = who.example.split("@", 1)[0]
    return (f"symbol versions: {_n(who.versioned)} of the imports carry one, e.g. "
            f"{who.example}. The index comes from DT_VERSYM (.gnu.version, one entry per "
            f"symbol) and names an entry of DT_VERNEED (.gnu.version_r: per needed library, "
            f"the versions this object was linked against). Binding matches name and version "
            f"(as dlvsym does), so {name} binds to the {name} of that version, not any {name}")


def meaning_sentences(by_type: dict[str, int]) -> list[tuple[str, str]]:
    """One ("types", ...) line per relocation type applied: what it writes."""
    present = [k for k in sorted(by_type, key=lambda k: -by_type[k]) if by_type[k]]
    if not present:
        return []
    out = [("types", "what each type writes (S the symbol's address, A the addend, B the load "
            "bias, P the place written):")]
    for k in present:
        meaning = RELOCATION_MEANINGS.get(k, "a type this explanation has no words for")
        out.append(("types", f"  {k.removeprefix('R_X86_64_')} ({_n(by_type[k])}): {meaning}"))
    return out


def relocation_sentences(by_type: dict[str, int], extern: int, unresolved: int,
                         resolver: str, who: Bindings | None = None,
                         obj_name: str = "the object") -> list[tuple[str, str]]:
    """What relocation did, from the outcome's counts per type: ("bind", ...) for the
    resolver (and the symbol versions), ("types", ...) one line per type applied saying what
    it writes, ("apply", ...) for the one scatter, ("rare", ...) for the other kinds (in the
    same bulk pass; IFUNC-chosen values in a second write after their resolvers).
    ``who``: who the slots name (:func:`bindings`), ``obj_name`` the object's file name."""
    out = []
    who = who if who is not None else Bindings()
    relative = by_type.get("R_X86_64_RELATIVE", 0)
    slots = {k: v for k, v in by_type.items() if k in _SYMBOL_SLOTS and v}
    nslots = sum(slots.values())
    if slots:
        names = "/".join(k.removeprefix("R_X86_64_") for k in _SYMBOL_SLOTS if k in slots)
        out.append(("bind", bind_sentence(nslots, names, who, extern, unresolved, resolver,
                                          obj_name)))
    if who.versioned:
        out.append(("bind", version_sentence(who)))
    out += meaning_sentences(by_type)
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
    if not by_type or not any(by_type.values()):
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
