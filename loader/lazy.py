"""Lazy binding: the GOT of a lazy object, and on the host the native trampoline behind GOT[2].

Part of the ``loader`` layer, beside ``loader.reloc`` (imports ``loader.tables``,
``loader.elf``, ``loader.symbols``, ``loader.mmap``). How x86-64 lazy binding works (psABI
section 5.2): each PLT entry is ``jmp *slot(%rip)``; a lazy slot first holds the address of the
``push $index`` just after that jump (the word the file holds, plus the load bias), so the first
call pushes the index of its relocation in DT_JMPREL and jumps to PLT0, which pushes GOT[1]
(the word that identifies the object) and jumps to ``*GOT[2]`` (the resolver). The resolver
finds the symbol, patches the slot and jumps to the function: later calls go straight there.
IBT PLTs (``-z ibtplt``: ``endbr64`` and a ``.plt.sec``) differ only in where the jumps are.

Two parts:

- pure, for both backends: :func:`lazy_got` (DT_PLTGOT, the JUMP_SLOTs of DT_JMPREL, each
  slot's lazy value), :func:`slot_wanted` (the symbol the slot of an index wants),
  :func:`make_lazy` (write the lazy state through any ``Mmap``), :func:`binds_now`;
- host only: :class:`LazyTrampoline` (the native resolver, calling back into Python) and
  :class:`HostLazyBinder` (one trampoline for many objects, patching their slots).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage
from loader.elfdefs import ADDR_SIZE, DF, DF_1, DT, MASK64, PF, R_X86_64
from loader.errors import ElfDynamicError, ElfRelocationError, ElfSymbolError
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.reloc import OWN_CODE, _file_words, first_outside_code
from loader.symbols import symbol_label
from loader.tables import DynamicTables, RelocTable

__all__ = [
    "CODE",
    "FAILED_OFFSET",
    "LISTING",
    "RESOLVE_OFFSET",
    "Bound",
    "HostLazyBinder",
    "LazyFailure",
    "LazyGot",
    "LazyTrampoline",
    "SlotWanted",
    "binds_now",
    "lazy_got",
    "make_lazy",
    "slot_wanted",
    "store_word",
]

# ---------------------------------------------------------------------------------------------
# The trampoline: machine code beside its listing (GNU as, AT&T syntax)
#
# PLT0 jumps here with the stack as: [rsp] GOT[1], [rsp+8] the relocation index, [rsp+16] the
# caller's return address. Every register that may carry an argument is saved (rax holds the
# vector-register count of a varargs call; r10 the static chain), the stack is aligned to 16
# bytes for the call into Python, and the target is reached by a jump: the caller's return
# address is then on top, as if the caller had called the function itself.

_TRAMPOLINE: tuple[tuple[str, str, str], ...] = (
    # (bytes, instruction, why)
    ("", "lazy_trampoline:", "PLT0 jumps here through GOT[2]"),
    ("f3 0f 1e fa", "endbr64", "a valid indirect-jump target under IBT"),
    ("55", "push %rbp", ""),
    ("48 89 e5", "mov %rsp, %rbp", "[rbp+8] GOT[1], [rbp+16] index"),
    ("48 83 e4 f0", "and $-16, %rsp", "align for movaps and the call"),
    ("48 81 ec c0 00 00 00", "sub $0xc0, %rsp", "8 registers, 8 xmm registers"),
    ("48 89 04 24", "mov %rax, 0x00(%rsp)", "varargs: vector registers used"),
    ("48 89 7c 24 08", "mov %rdi, 0x08(%rsp)", "arguments 1-6"),
    ("48 89 74 24 10", "mov %rsi, 0x10(%rsp)", ""),
    ("48 89 54 24 18", "mov %rdx, 0x18(%rsp)", ""),
    ("48 89 4c 24 20", "mov %rcx, 0x20(%rsp)", ""),
    ("4c 89 44 24 28", "mov %r8, 0x28(%rsp)", ""),
    ("4c 89 4c 24 30", "mov %r9, 0x30(%rsp)", ""),
    ("4c 89 54 24 38", "mov %r10, 0x38(%rsp)", "static chain"),
    ("0f 29 44 24 40", "movaps %xmm0, 0x40(%rsp)", "floating-point arguments 1-8"),
    ("0f 29 4c 24 50", "movaps %xmm1, 0x50(%rsp)", ""),
    ("0f 29 54 24 60", "movaps %xmm2, 0x60(%rsp)", ""),
    ("0f 29 5c 24 70", "movaps %xmm3, 0x70(%rsp)", ""),
    ("0f 29 a4 24 80 00 00 00", "movaps %xmm4, 0x80(%rsp)", ""),
    ("0f 29 ac 24 90 00 00 00", "movaps %xmm5, 0x90(%rsp)", ""),
    ("0f 29 b4 24 a0 00 00 00", "movaps %xmm6, 0xa0(%rsp)", ""),
    ("0f 29 bc 24 b0 00 00 00", "movaps %xmm7, 0xb0(%rsp)", ""),
    ("48 8b 7d 08", "mov 0x08(%rbp), %rdi", "resolve(GOT[1],"),
    ("48 8b 75 10", "mov 0x10(%rbp), %rsi", "         index)"),
    ("ff 15 7c 00 00 00", "call *resolve(%rip)", "into Python; returns the target"),
    ("49 89 c3", "mov %rax, %r11", "r11: scratch, never an argument"),
    ("0f 28 bc 24 b0 00 00 00", "movaps 0xb0(%rsp), %xmm7", ""),
    ("0f 28 b4 24 a0 00 00 00", "movaps 0xa0(%rsp), %xmm6", ""),
    ("0f 28 ac 24 90 00 00 00", "movaps 0x90(%rsp), %xmm5", ""),
    ("0f 28 a4 24 80 00 00 00", "movaps 0x80(%rsp), %xmm4", ""),
    ("0f 28 5c 24 70", "movaps 0x70(%rsp), %xmm3", ""),
    ("0f 28 54 24 60", "movaps 0x60(%rsp), %xmm2", ""),
    ("0f 28 4c 24 50", "movaps 0x50(%rsp), %xmm1", ""),
    ("0f 28 44 24 40", "movaps 0x40(%rsp), %xmm0", ""),
    ("4c 8b 54 24 38", "mov 0x38(%rsp), %r10", ""),
    ("4c 8b 4c 24 30", "mov 0x30(%rsp), %r9", ""),
    ("4c 8b 44 24 28", "mov 0x28(%rsp), %r8", ""),
    ("48 8b 4c 24 20", "mov 0x20(%rsp), %rcx", ""),
    ("48 8b 54 24 18", "mov 0x18(%rsp), %rdx", ""),
    ("48 8b 74 24 10", "mov 0x10(%rsp), %rsi", ""),
    ("48 8b 7c 24 08", "mov 0x08(%rsp), %rdi", ""),
    ("48 8b 04 24", "mov 0x00(%rsp), %rax", ""),
    ("48 89 ec", "mov %rbp, %rsp", ""),
    ("5d", "pop %rbp", ""),
    ("48 83 c4 10", "add $0x10, %rsp", "drop GOT[1] and index"),
    ("41 ff e3", "jmp *%r11", "to the function, never a call"),
    ("", "lazy_failed:", "the target when resolve failed:"),
    ("f3 0f 1e fa", "endbr64", ""),
    ("31 c0", "xor %eax, %eax", "the call returns 0"),
    ("31 d2", "xor %edx, %edx", ""),
    ("66 0f ef c0", "pxor %xmm0, %xmm0", ""),
    ("66 0f ef c9", "pxor %xmm1, %xmm1", ""),
    ("c3", "ret", "to the caller"),
    ("66 90", ".p2align 3", ""),
    ("", "resolve:", "the Python callback's address"),
    ("00 00 00 00 00 00 00 00", ".quad 0", "written when the page is made"),
)

CODE = bytes.fromhex("".join(hexes for hexes, _, _ in _TRAMPOLINE))
"""The trampoline's machine code (``LISTING`` assembled); the page holds it from offset 0."""


def _line(text: str, why: str) -> str:
    """One line of the listing: labels flush left, instructions indented, then the comment."""
    line = text if text.endswith(":") else "    " + text
    return f"{line:<32}# {why}" if why else line


LISTING = "\n".join(_line(text, why) for _, text, why in _TRAMPOLINE) + "\n"
"""The assembly of ``CODE``, one instruction a line (``as`` reproduces ``CODE`` from it)."""


def _label_offset(label: str) -> int:
    """Where ``label:`` is in ``CODE``: the bytes of the entries before it."""
    texts = [text for _, text, _ in _TRAMPOLINE]
    before = _TRAMPOLINE[: texts.index(label + ":")]
    return sum(len(bytes.fromhex(hexes)) for hexes, _, _ in before)


FAILED_OFFSET = _label_offset("lazy_failed")
"""Where the failure path starts: it returns 0 (rax, rdx, xmm0, xmm1) to the caller."""
RESOLVE_OFFSET = _label_offset("resolve")
"""Where the callback's address is stored (8-aligned); ``call *resolve(%rip)`` reads it."""

Resolve = Callable[[int, int], int]
"""``resolve(got1, reloc_index) -> target``: bind the slot, patch it, return the function."""

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)


class LazyFailure(NamedTuple):
    """A bind that failed in the trampoline: the GOT[1] word and index it came with, and what
    ``resolve`` raised."""

    got1: int
    reloc_index: int
    error: BaseException


class LazyTrampoline:
    """The native resolver GOT[2] points at, on the host: one page holding ``CODE``, read and
    execute (written first while read+write, never both at once), that saves the argument
    registers, calls ``resolve(got1, index)`` (Python, through a ctypes callback) and jumps
    to the address it returns. ``resolve`` patches the slot itself (:func:`store_word`).

    A ``resolve`` that raises, or returns 0, crashes nothing: the error is kept in
    ``failures`` with GOT[1] and the index, the slot stays lazy (the next call tries again)
    and the call returns 0 (rax, rdx, xmm0, xmm1) to its caller, which cannot tell it from a
    result: call :meth:`check` after calls that may bind. (glibc, which cannot do that,
    prints "symbol lookup error" and exits the process.)

    Threads: any number may be inside at once; the state is on each one's stack and the
    callback takes the GIL, so ``resolve`` runs one at a time. Not kept across the call into
    Python: the upper halves of ymm/zmm registers (arguments of type ``__m256``/``__m512``
    only; glibc's resolver keeps them with xsave) and the x87 stack (never an argument).
    ``close()`` unmaps the page: a lazy slot still leading here would then crash.
    """

    def __init__(self, mm: Mmap, resolve: Resolve) -> None:
        """Map and fill the page. ValueError when ``mm`` does not map into this process
        (``runs_code`` False: there lazy binding can only be recorded as pending)."""
        if not mm.runs_code:
            raise ValueError(f"LazyTrampoline: {type(mm).__name__} does not run code; the "
                             "trampoline belongs to the host backend (LibcMmap)")
        self.mm = mm
        self.failures: list[LazyFailure] = []
        self._resolve = resolve
        self._callback = _CALLBACK(self._call)      # alive as long as the page points at it
        rw = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
        self.address = mm.mmap_anonymous(0, mm.page_size, rw, MapFlags.MAP_PRIVATE)
        self.failed_address = self.address + FAILED_OFFSET
        try:
            pointer = ctypes.cast(self._callback, ctypes.c_void_p).value or 0
            mm.write(self.address, CODE[:RESOLVE_OFFSET] + pointer.to_bytes(ADDR_SIZE, "little"))
            mm.mprotect(self.address, mm.page_size, ProtFlags.PROT_READ | ProtFlags.PROT_EXEC)
        except BaseException:
            mm.munmap(self.address, mm.page_size)
            raise
        self.open = True

    def _call(self, got1: int, index: int) -> int:
        """The callback: ``resolve``'s target, or the failure path (the error kept)."""
        try:
            target = int(self._resolve(got1, index)) & MASK64
            if not target:
                raise ValueError(f"resolve(GOT[1]={got1:#x}, index={index}) returned 0")
            return target
        except BaseException as exc:  # nothing may unwind through native frames
            self.failures.append(LazyFailure(got1, index, exc))
            return self.failed_address

    def check(self) -> None:
        """Raise the first kept failure's error (noting GOT[1] and the index) and forget
        them all; nothing when none failed."""
        if not self.failures:
            return
        first, self.failures = self.failures[0], []
        first.error.add_note(f"lazy binding of DT_JMPREL index {first.reloc_index} "
                             f"for GOT[1]={first.got1:#x}")
        raise first.error

    def close(self) -> None:
        """Unmap the page (a second call does nothing)."""
        if self.open:
            self.open = False
            self.mm.munmap(self.address, self.mm.page_size)

    def __enter__(self) -> LazyTrampoline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_word(addr: int, value: int) -> None:
    """Store the 64-bit ``value`` at ``addr`` in this process with one 8-byte store (atomic
    for an aligned ``addr``: another thread sees the old word or the new one). Host only;
    ``addr`` must be mapped writable, or the process takes SIGSEGV."""
    ctypes.c_uint64.from_address(addr).value = value & MASK64


# ---------------------------------------------------------------------------------------------
# The GOT of a lazy object (pure: both backends)

GOT_RESERVED = 3
"""GOT[0] (the file's _DYNAMIC), GOT[1] (the object's identity), GOT[2] (the resolver)."""


@dataclass(frozen=True, slots=True)
class LazyGot:
    """What a lazy object's GOT holds, in absolute addresses (the load bias added).

    ``got``: DT_PLTGOT (GOT[0]; GOT[1] and GOT[2] follow). Per JUMP_SLOT of DT_JMPREL, in
    table order: ``index`` (its position in DT_JMPREL: what its PLT entry pushes),
    ``slot`` (r_offset), ``r_sym`` and ``lazy_value`` (the word the file holds at r_offset:
    the PLT entry's ``push``).
    """

    got: int
    index: npt.NDArray[np.int64]
    slot: npt.NDArray[np.uint64]
    r_sym: npt.NDArray[np.intp]
    lazy_value: npt.NDArray[np.uint64]

    @property
    def got1(self) -> int:
        """The address of GOT[1]."""
        return self.got + ADDR_SIZE

    @property
    def got2(self) -> int:
        """The address of GOT[2]."""
        return self.got + 2 * ADDR_SIZE


def binds_now(tables: DynamicTables) -> bool:
    """True when the object asks to be bound at load (DT_BIND_NOW, DF_BIND_NOW or
    DF_1_NOW: ``-z now``), as glibc reads it; such an object is never bound lazily."""
    return (DT.BIND_NOW in tables.tags or bool(tables.tags.get(DT.FLAGS, 0) & DF.BIND_NOW)
            or bool(tables.tags.get(DT.FLAGS_1, 0) & DF_1.NOW))


def _jmprel(tables: DynamicTables) -> RelocTable | None:
    """The DT_JMPREL table, or None."""
    return next((t for t in tables.relocs if t.name == "DT_JMPREL"), None)


def _in_writable_load(image: ElfImage, vaddr: int, length: int) -> bool:
    """``[vaddr, vaddr+length)`` lies inside one writable PT_LOAD (memory size)."""
    return any(seg.p_flags & PF.W and seg.p_vaddr <= vaddr and vaddr + length <= seg.end
               for seg in image.loads)


def _check_slots(image: ElfImage, index: npt.NDArray[np.int64], where: npt.NDArray[np.uint64],
                 values: npt.NDArray[np.uint64]) -> None:
    """Every slot 8-aligned (its patch is one store) and outside PT_GNU_RELRO (sealed
    read-only after relocation: such an object must be bound now); every lazy value inside
    the object's own code (the first call jumps there). ElfRelocationError naming the first
    entry that is not."""
    relro = image.relro
    bad = (where % np.uint64(ADDR_SIZE)) != 0
    if relro is not None:
        bad |= (where >= np.uint64(relro.p_vaddr)) & (where < np.uint64(relro.end))
    if bad.any():
        k = int(np.argmax(bad))
        raise ElfRelocationError(f"DT_JMPREL[{int(index[k])}] JUMP_SLOT r_offset",
                                 int(where[k]), "8-aligned and outside PT_GNU_RELRO to be "
                                 "bound lazily (bind the object now)")
    outside = first_outside_code(image, values)
    if outside is not None:
        k = int(np.flatnonzero(values == np.uint64(outside))[0])
        raise ElfRelocationError(f"DT_JMPREL[{int(index[k])}] lazy value", outside, OWN_CODE)


def lazy_got(image: ElfImage, tables: DynamicTables, bias: int) -> LazyGot:
    """What the GOT of the object loaded at ``bias`` holds in the lazy state (``LazyGot``),
    read from the file only. Without DT_JMPREL there is none: ``got`` is 0, no slots.

    Raises ElfDynamicError when DT_JMPREL comes without DT_PLTGOT or GOT[0..2] is not inside
    a writable PT_LOAD; ElfRelocationError as ``_check_slots``.
    """
    table = _jmprel(tables)
    if table is None:
        none = np.zeros(0, dtype=np.int64)
        return LazyGot(0, none, none.astype(np.uint64), none.astype(np.intp),
                       none.astype(np.uint64))
    pltgot = tables.tags.get(DT.PLTGOT)
    if pltgot is None:
        raise ElfDynamicError("DT_PLTGOT", 0, "present with DT_JMPREL (GOT[1] and GOT[2] "
                              "are where PLT0 finds the object and the resolver)")
    if not _in_writable_load(image, pltgot, GOT_RESERVED * ADDR_SIZE):
        raise ElfDynamicError("DT_PLTGOT", pltgot, "GOT[0..2] inside one writable PT_LOAD")
    index = np.flatnonzero(table.r_type == int(R_X86_64.JUMP_SLOT)).astype(np.int64)
    where = table.r_offset[index]
    values = _file_words(image, where)
    _check_slots(image, index, where, values)
    b = np.uint64(bias & MASK64)
    return LazyGot((pltgot + bias) & MASK64, index, where + b, table.r_sym[index], values + b)


class SlotWanted(NamedTuple):
    """What the JUMP_SLOT of one DT_JMPREL index wants: its slot (absolute) and the symbol
    (name, version or None)."""

    reloc_index: int
    slot: int
    name: str
    version: str | None


def slot_wanted(got: LazyGot, tables: DynamicTables, index: int) -> SlotWanted:
    """The slot and symbol of DT_JMPREL entry ``index`` (as a PLT entry pushed it).

    Raises ElfRelocationError when ``index`` is not a JUMP_SLOT's index, ElfSymbolError when
    the entry names no symbol.
    """
    fits = 0 <= index <= np.iinfo(np.int64).max       # else searchsorted cannot compare it
    pos = int(np.searchsorted(got.index, index)) if fits else len(got.index)
    if pos >= len(got.index) or int(got.index[pos]) != index:
        raise ElfRelocationError("DT_JMPREL index", index,
                                 f"one of the {len(got.index)} JUMP_SLOT entries' indices")
    sym = int(got.r_sym[pos])
    if sym == 0:
        raise ElfSymbolError(f"DT_JMPREL[{index}] r_sym", 0, "a symbol (a JUMP_SLOT binds one)")
    name, version = symbol_label(tables, sym)
    return SlotWanted(index, int(got.slot[pos]), name, version)


def make_lazy(mm: Mmap, got: LazyGot, ident: int, resolver: int) -> None:
    """Write the lazy state through ``mm`` (either backend): every slot its lazy value,
    GOT[1] ``ident`` (what identifies the object to the resolver), GOT[2] ``resolver``
    (the trampoline's address on the host). Nothing without DT_JMPREL (``got.got`` 0)."""
    if not got.got:
        return
    mm.write_words(got.slot, got.lazy_value)
    mm.write_words(np.array([got.got1, got.got2], dtype=np.uint64),
                   np.array([ident & MASK64, resolver & MASK64], dtype=np.uint64))


# ---------------------------------------------------------------------------------------------
# The host's binder: one trampoline, many lazy objects

Lookup = Callable[[str, "str | None"], "int | None"]
"""``(name, version or None) -> absolute address, or None when not found``."""


class Bound(NamedTuple):
    """One lazy bind done: the object (its GOT[1] word), the index, slot, symbol, target."""

    ident: int
    reloc_index: int
    slot: int
    name: str
    version: str | None
    target: int


@dataclass(frozen=True, slots=True)
class _Lazy:
    """A lazy object as the binder knows it."""

    got: LazyGot
    tables: DynamicTables
    lookup: Lookup


@dataclass
class HostLazyBinder:
    """Lazy binding on the host for any number of objects: one :class:`LazyTrampoline` and,
    per object, known by the word in its GOT[1], its ``LazyGot``, its tables and how to look
    a symbol up. The first call through a slot binds it: ``lookup(name, version)``, the slot
    patched (:func:`store_word`), the bind appended to ``bound``. A symbol not found is an
    ElfSymbolError kept in ``trampoline.failures`` (see :class:`LazyTrampoline`)."""

    mm: Mmap
    objects: dict[int, _Lazy] = field(default_factory=dict)
    bound: list[Bound] = field(default_factory=list)
    trampoline: LazyTrampoline = field(init=False)

    def __post_init__(self) -> None:
        self.trampoline = LazyTrampoline(self.mm, self.resolve)

    def attach(self, got: LazyGot, tables: DynamicTables, lookup: Lookup, *,
               ident: int | None = None) -> int:
        """Put a loaded object in the lazy state (``make_lazy``) and bind it from now on.
        ``ident`` (GOT[1]) defaults to the GOT's address. Returns ``ident``. In ld's lazy
        layout GOT[0..2] lie inside PT_GNU_RELRO: attach before RELRO is sealed (or open
        it around the call), as glibc writes them during relocation."""
        ident = got.got if ident is None else ident
        self.objects[ident] = _Lazy(got, tables, lookup)
        make_lazy(self.mm, got, ident, self.trampoline.address)
        return ident

    def detach(self, ident: int) -> None:
        """Forget an object (before it is unloaded)."""
        self.objects.pop(ident, None)

    def resolve(self, got1: int, index: int) -> int:
        """The trampoline's callback: bind slot ``index`` of object ``got1``, patch it,
        return the target. KeyError for an unknown ``got1``; ElfSymbolError when the
        lookup finds nothing; as ``slot_wanted`` for a bad index."""
        obj = self.objects[got1]
        want = slot_wanted(obj.got, obj.tables, index)
        target = obj.lookup(want.name, want.version)
        if not target:
            shown = want.name + (f"@{want.version}" if want.version else "")
            raise ElfSymbolError(f"DT_JMPREL[{index}] symbol", shown, "defined in the scope")
        store_word(want.slot, target)
        self.bound.append(Bound(got1, index, want.slot, want.name, want.version, target))
        return target

    def close(self) -> None:
        """Unmap the trampoline (every object attached must be gone or bound by then)."""
        self.trampoline.close()


