"""Thread-local storage of a process image, computed as glibc 2.36's ld.so does on x86-64.

Part of the ``loader`` pipeline layer: pure arithmetic over PT_TLS headers (module ids, the
static TLS layout, the surplus) plus :func:`build_thread_area`, which writes one thread's TLS
blocks, TCB and DTV into any ``Mmap``. A process image (``loader.LinkMap``) keeps one
:class:`TlsState` and hands each object's :class:`~loader.reloc.TlsLayout` to ``loader.load``.

x86-64 uses TLS variant II: the thread pointer (%fs base) points at the TCB, and the static
TLS blocks lie *below* it. A module's ``tp_offset`` is ``tp - block start``, so a variable at
offset ``v`` in the block is at ``tp - tp_offset + v`` (R_X86_64_TPOFF64 stores
``v - tp_offset``). What glibc does, and so what this module does:

* **Module ids** (``_dl_assign_tls_modid``): each object with a non-empty PT_TLS gets one when
  it is mapped: the startup objects 1, 2, ... in link-map order; a dlopen'ed object the lowest
  id no loaded module holds (ids freed by dlclose are reused; startup ids never are).
* **Static layout** (``_dl_determine_tlsoffset``, at startup only): blocks are placed in id
  order, each at the smallest offset that keeps its first byte congruent to its ``p_vaddr``
  modulo ``p_align`` (the *firstbyte* rule: the linker laid the block out for that
  congruence). When that rounding leaves a gap below a block, glibc remembers the largest such
  gap (``freetop``/``freebottom``) and puts a later block in it when it fits.
* **Surplus** (``_dl_tls_static_surplus_init``): past the startup blocks glibc reserves
  ``(nns - 1) * 144 + nns * 144 + optional_static_tls + legacy`` bytes (1664 with the default
  tunables ``rtld.nns=4``, ``rtld.optional_static_tls=512``), so that dlopen'ed objects can
  still get static TLS. The whole area is ``roundup(used + surplus, align) + TLS_TCB_SIZE``.
* **dlopen** (``_dl_try_allocate_static_tls``): a dlopen'ed object's block is dynamic
  (allocated per thread by ``__tls_get_addr``) unless a relocation needs it static:
  R_X86_64_TPOFF64 (initial-exec, DF_STATIC_TLS objects) takes it from the surplus or fails
  the dlopen; R_X86_64_TLSDESC tries, within the 512 optional bytes, and falls back to dynamic.
  :meth:`TlsState.use_static` is that step (``add_dlopen(static=...)`` makes it).
* **dlclose** (``_dl_close_worker``): the id is freed; static TLS is given back only when the
  freed blocks are contiguous and end at the top of what is used (the optional budget is not
  given back).

Where this module chooses: a ``p_align`` of 0 counts as 1 (glibc divides by it and would
crash); the static TLS a dlopen's relocations need is asked for up front
(``add_dlopen(static=...)``), since ``loader.load`` needs each layout before it relocates;
glibc's "forced dynamic" state (a module first reached through ``__tls_get_addr`` never becomes
static) needs running code and is not modelled.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from loader.elf import Segment
from loader.errors import ElfRelocationError, ElfSegmentError
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import page_round_up
from loader.reloc import TlsLayout

__all__ = [
    "DTV_SURPLUS",
    "TCB_ALIGNMENT",
    "TLS_DTV_UNALLOCATED",
    "TLS_TCB_SIZE",
    "TcbHead",
    "ThreadArea",
    "TlsModule",
    "TlsObject",
    "TlsState",
    "build_thread_area",
    "static_offsets",
    "static_surplus",
]

TLS_TCB_SIZE = 2368
"""sizeof(struct pthread) in glibc 2.36 x86-64 (Debian 2.36-9): the TCB above the thread
pointer. tests/test_tls_layout.py checks it against ``_dl_get_tls_static_info``."""

TCB_ALIGNMENT = 64
"""glibc's TCB_ALIGNMENT on x86: the least alignment of the static TLS area."""

DTV_SURPLUS = 14
"""A new DTV has this many entries past the highest module id (glibc's DTV_SURPLUS)."""

TLS_DTV_UNALLOCATED = (1 << 64) - 1
"""A DTV entry of a module whose block this thread has not allocated yet ((void *) -1)."""

LIBC_IE_TLS = 144      # initial-exec TLS of libc.so, per extra namespace
OTHER_IE_TLS = 144     # initial-exec TLS of other libraries, per namespace
DEFAULT_NNS = 4        # tunable glibc.rtld.nns
OPTIONAL_TLS = 512     # tunable glibc.rtld.optional_static_tls
DL_NNS = 16            # the most link-map namespaces glibc supports
MAX_TLS_EXTENT = 1 << 47
"""Bound on a PT_TLS p_memsz and p_align read from a file (the user address space): a
larger block can never be allocated, and the bound keeps the arithmetic within 64 bits."""

_LEGACY_TLS = 1664 - ((DEFAULT_NNS - 1) * LIBC_IE_TLS + DEFAULT_NNS * OTHER_IE_TLS
                      + OPTIONAL_TLS)
_WORD = 8
_DTV_ENTRY = 16        # union dtv: {size_t counter} or {void *val; void *to_free}


def _roundup(x: int, align: int) -> int:
    """``x`` rounded up to a multiple of ``align`` (> 0)."""
    return -(-x // align) * align


def static_surplus(nns: int = DEFAULT_NNS, optional_static_tls: int = OPTIONAL_TLS,
                   naudit: int = 0) -> int:
    """The bytes glibc reserves past the startup blocks for later static TLS, given the
    tunables rtld.nns and rtld.optional_static_tls and the number of audit modules (1664 by
    default). ValueError when there are more audit modules than free namespaces, as ld.so
    refuses to start then."""
    nns = min(nns, DL_NNS)
    if DL_NNS - nns < naudit:
        raise ValueError(f"naudit = {naudit}: at most {DL_NNS - nns} audit modules with "
                         f"nns {nns}")
    nns += naudit
    return (nns - 1) * LIBC_IE_TLS + nns * OTHER_IE_TLS + optional_static_tls + _LEGACY_TLS


class TlsObject(NamedTuple):
    """An object as the TLS state needs it: its name in the link map, its PT_TLS header (None
    when it has none) and its load bias (where its init image is: p_vaddr + load_bias)."""

    name: str
    tls: Segment | None
    load_bias: int = 0


@dataclass(frozen=True, slots=True)
class TlsModule:
    """One object's TLS module: id, block (PT_TLS p_memsz, p_filesz, p_align, p_vaddr), load
    bias, where its block is (``tp_offset``: tp - block start; None for dynamic TLS) and the
    TLS generation that added it (glibc's slotinfo ``gen``)."""

    name: str
    module_id: int
    memsz: int
    filesz: int
    align: int
    image_vaddr: int
    load_bias: int
    tp_offset: int | None
    generation: int
    startup: bool

    @property
    def firstbyte_offset(self) -> int:
        """``p_vaddr mod p_align``: where the block's first byte sits in an aligned unit."""
        return self.image_vaddr & (self.align - 1)

    @property
    def layout(self) -> TlsLayout:
        """What ``loader.load(..., tls=)`` takes for this object."""
        return TlsLayout(self.module_id, self.tp_offset)

    def row(self) -> dict[str, object]:
        """One line of :meth:`TlsState.table`."""
        return {"name": self.name, "module_id": self.module_id, "size": self.memsz,
                "align": self.align,
                "static_offset": "dynamic" if self.tp_offset is None else self.tp_offset}


def _checked_block(obj: TlsObject) -> tuple[int, int, int, int] | None:
    """(memsz, filesz, align, p_vaddr) of ``obj``'s PT_TLS; None without one or when it is
    empty (glibc gives an empty PT_TLS no module). ElfSegmentError past MAX_TLS_EXTENT."""
    seg = obj.tls
    if seg is None or seg.p_memsz == 0:
        return None
    for field_name, value in (("p_memsz", seg.p_memsz), ("p_align", seg.p_align)):
        if value >= MAX_TLS_EXTENT:
            raise ElfSegmentError(f"PT_TLS.{field_name} of {obj.name}", value,
                                  f"below {MAX_TLS_EXTENT:#x} (the user address space)")
    return seg.p_memsz, seg.p_filesz, max(seg.p_align, 1), seg.p_vaddr


def static_offsets(blocks: Sequence[tuple[int, int, int]]) -> tuple[list[int], int, int]:
    """glibc's ``_dl_determine_tlsoffset`` for TLS variant II. ``blocks`` are (p_memsz,
    p_align >= 1, p_vaddr) in module-id order. Returns each block's tp offset, the bytes used
    below the thread pointer (``dl_tls_static_used``) and the alignment the area needs
    (``dl_tls_static_align``: the largest p_align, at least TCB_ALIGNMENT)."""
    offsets: list[int] = []
    used, freetop, freebottom, max_align = 0, 0, 0, TCB_ALIGNMENT
    for memsz, align, vaddr in blocks:
        firstbyte = -vaddr & (align - 1)
        max_align = max(max_align, align)
        if freebottom - freetop >= memsz:          # try the remembered gap first
            off = _roundup(freetop + memsz - firstbyte, align) + firstbyte
            if off <= freebottom:
                freetop = off
                offsets.append(off)
                continue
        off = _roundup(used + memsz - firstbyte, align) + firstbyte
        if off > used + memsz + (freebottom - freetop):   # a larger gap than the one kept
            freetop, freebottom = used, off - memsz
        used = off
        offsets.append(off)
    return offsets, used, max_align


@dataclass(slots=True)
class TlsState:
    """The TLS modules of one process image and its static TLS area, as ld.so keeps them.

    Make it with the tunables (rtld.nns, rtld.optional_static_tls) and the number of audit
    modules; call :meth:`add_startup` once with the startup objects, then :meth:`add_dlopen`,
    :meth:`use_static` and :meth:`remove` as objects come and go. ``static_used`` is
    glibc's ``dl_tls_static_used``, ``static_size`` and ``static_align`` what each thread
    allocates (``dl_tls_static_size`` includes the TCB), ``optional_left`` the optional
    surplus TLSDESC may still take, ``generation`` glibc's ``dl_tls_generation``.
    """

    nns: int = DEFAULT_NNS
    optional_static_tls: int = OPTIONAL_TLS
    naudit: int = 0
    static_used: int = field(default=0, init=False)
    static_size: int = field(default=0, init=False)
    static_align: int = field(default=TCB_ALIGNMENT, init=False)
    optional_left: int = field(default=0, init=False)
    generation: int = field(default=0, init=False)
    started: bool = field(default=False, init=False)
    _modules: dict[str, TlsModule] = field(default_factory=dict, init=False)

    @property
    def surplus(self) -> int:
        """The static TLS surplus (glibc's ``dl_tls_static_surplus``)."""
        return static_surplus(self.nns, self.optional_static_tls, self.naudit)

    @property
    def modules(self) -> list[TlsModule]:
        """Every module, in module-id order."""
        return sorted(self._modules.values(), key=lambda m: m.module_id)

    @property
    def dtv_length(self) -> int:
        """The length a new thread's DTV gets: the highest module id + DTV_SURPLUS."""
        return max((m.module_id for m in self._modules.values()), default=0) + DTV_SURPLUS

    @property
    def dtv_generation(self) -> int:
        """The generation a new thread's DTV starts at: the newest loaded module's."""
        return max((m.generation for m in self._modules.values()), default=0)

    def module(self, name: str) -> TlsModule:
        """The module of object ``name``; KeyError when it has none."""
        return self._modules[name]

    def layout(self, name: str) -> TlsLayout | None:
        """What ``loader.load(..., tls=)`` takes for object ``name``; None without TLS."""
        mod = self._modules.get(name)
        return None if mod is None else mod.layout

    def set_load_bias(self, name: str, load_bias: int) -> TlsModule:
        """Record where object ``name`` was loaded (its init image is at p_vaddr +
        load_bias): ``loader.load`` needs the layout before it chooses the bias."""
        self._modules[name] = replace(self._modules[name], load_bias=load_bias)
        return self._modules[name]

    def table(self) -> list[dict[str, object]]:
        """Per module, in id order: name, module_id, size, align, static_offset (bytes below
        the thread pointer, or "dynamic")."""
        return [m.row() for m in self.modules]

    def add_startup(self, objects: Iterable[TlsObject]) -> list[TlsModule]:
        """Give the startup objects (link-map order; those without PT_TLS are skipped) ids
        1, 2, ... and their static offsets, and size the static area: ld.so's ``init_tls``.
        Once per state, before any dlopen (ValueError otherwise)."""
        if self.started:
            raise ValueError("add_startup: the startup objects were already added")
        self.started = True
        found = [(obj, block) for obj in objects if (block := _checked_block(obj))]
        offsets, used, align = static_offsets([(b[0], b[2], b[3]) for _, b in found])
        self.static_used, self.static_align = used, align
        self.static_size = _roundup(used + self.surplus, align) + TLS_TCB_SIZE
        self.optional_left = self.optional_static_tls
        self.generation = 1 if found else 0
        for i, ((obj, block), off) in enumerate(zip(found, offsets, strict=True)):
            self._add(obj, block, i + 1, off, startup=True)
        return self.modules

    def add_dlopen(self, objects: Iterable[TlsObject], *,
                   static: Iterable[tuple[str, bool]] = ()) -> list[TlsModule]:
        """One dlopen's newly loaded objects, in load order: each with PT_TLS gets the lowest
        free module id and dynamic TLS. Then the static TLS its relocations ask for, in the
        order glibc relocates (each object after its dependencies): ``static`` holds
        (module name, optional) pairs, optional False for an R_X86_64_TPOFF64 against the
        module, True for an R_X86_64_TLSDESC (see :meth:`use_static`). On success the
        generation advances once if any object had TLS; returns the new modules. When a
        required block does not fit, the dlopen is undone as glibc's dlclose of a failed
        dlopen undoes it (:meth:`remove`) and the ElfRelocationError is raised."""
        if not self.started:
            self.add_startup(())
        added = []
        for obj in objects:
            block = _checked_block(obj)
            if block is not None:
                added.append(self._add(obj, block, self._lowest_free_id(), None,
                                       startup=False).name)
        try:
            for name, optional in static:
                self.use_static(name, optional=optional)
        except ElfRelocationError:
            self.remove(added)
            raise
        if added:
            self.generation += 1
            for name in added:
                self._modules[name] = replace(self._modules[name], generation=self.generation)
        return [self._modules[name] for name in added]

    def _add(self, obj: TlsObject, block: tuple[int, int, int, int], module_id: int,
             tp_offset: int | None, *, startup: bool) -> TlsModule:
        """Record ``obj``'s module (ValueError when the name is already there)."""
        if obj.name in self._modules:
            raise ValueError(f"TLS module {obj.name!r} is already loaded")
        memsz, filesz, align, vaddr = block
        mod = TlsModule(obj.name, module_id, memsz, filesz, align, vaddr, obj.load_bias,
                        tp_offset, self.generation, startup)
        self._modules[obj.name] = mod
        return mod

    def _lowest_free_id(self) -> int:
        """The lowest module id no loaded module holds (glibc fills dlclose's gaps first)."""
        taken = {m.module_id for m in self._modules.values()}
        return next(i for i in range(1, len(taken) + 2) if i not in taken)

    def use_static(self, name: str, *, optional: bool = False) -> TlsModule | None:
        """Give dlopen'ed module ``name`` a block in static TLS, as glibc does while
        relocating: for R_X86_64_TPOFF64 (``optional`` False) from the whole surplus, an
        ElfRelocationError when it does not fit (glibc fails the dlopen: "cannot allocate
        memory in static TLS block"); for R_X86_64_TLSDESC (``optional`` True) only within
        the optional surplus left, None when it does not fit (the module stays dynamic).
        A module already static is returned as it is."""
        mod = self._modules[name]
        if mod.tp_offset is not None:
            return mod
        offset = self._fit_static(mod, optional)
        if offset is None:
            if optional:
                return None
            free = self.static_size - TLS_TCB_SIZE - self.static_used
            raise ElfRelocationError(
                f"static TLS block of {name} (p_memsz + p_vaddr mod p_align)",
                mod.memsz + mod.firstbyte_offset,
                f"at most {free:#x} bytes free in static TLS, p_align at most "
                f"{self.static_align:#x} (glibc: cannot allocate memory in static TLS block)")
        self._modules[name] = replace(mod, tp_offset=offset)
        return self._modules[name]

    def _fit_static(self, mod: TlsModule, optional: bool) -> int | None:
        """glibc's ``_dl_try_allocate_static_tls`` (variant II): the highest-placed offset
        past ``static_used`` that keeps the firstbyte rule and fits below the area's top,
        charged to the optional budget when ``optional``. None when it does not fit."""
        if mod.align > self.static_align:
            return None
        free = self.static_size - TLS_TCB_SIZE - self.static_used
        need = mod.memsz + mod.firstbyte_offset
        if free < need:
            return None
        slack = (free - need) // mod.align * mod.align
        use = free - slack - mod.firstbyte_offset
        if optional:
            if use > self.optional_left:
                return None
            self.optional_left -= use
        self.static_used += use
        return self.static_used

    def remove(self, names: Iterable[str]) -> None:
        """One dlclose's unloaded objects, in the order glibc's dlclose visits them: their
        ids become free, the generation advances once if any had TLS, and static blocks
        are given back when they form one run at the top of ``static_used`` (glibc's
        reclaim). Names without a TLS module are ignored; a startup module is a ValueError
        (glibc never unloads those)."""
        gone = [self._modules[n] for n in names if n in self._modules]
        if any(m.startup for m in gone):
            raise ValueError(f"{[m.name for m in gone if m.startup]}: startup modules stay")
        chunk: tuple[int, int] | None = None
        for mod in gone:
            del self._modules[mod.name]
            if mod.tp_offset is not None:
                chunk = self._reclaim(chunk, mod.tp_offset, mod.memsz)
        if gone:
            self.generation += 1
        if chunk is not None and chunk[1] == self.static_used:
            self.static_used = chunk[0]

    def _reclaim(self, chunk: tuple[int, int] | None, offset: int, size: int
                 ) -> tuple[int, int]:
        """dlclose's bookkeeping of freed static TLS, offsets (start, end] below tp: grow
        the chunk being freed with a block next to it; else keep the block that may still
        be freed, giving back at once whatever already sits at the top."""
        block = (offset - size, offset)
        if chunk is None:
            return block
        start, end = chunk
        if offset == start:
            return offset - size, end
        if offset - size == end:
            return start, offset
        if end == self.static_used:
            self.static_used = start
            return block
        if offset == self.static_used:
            self.static_used = offset - size
            return chunk
        return block if end < offset else chunk


# ---------------------------------------------------------------------------------------------
# One thread's area: static TLS blocks, the TCB and the DTV, laid out as glibc lays them


class TcbHead(enum.IntEnum):
    """Offsets from tp of the tcbhead_t fields glibc sets for a new thread (x86-64)."""

    TCB = 0x0              # the TCB itself (tp): %fs:0 reads the thread pointer
    DTV = 0x8              # the DTV (its generation entry)
    SELF = 0x10            # the thread descriptor, which is the TCB too
    STACK_GUARD = 0x28     # the canary -fstack-protector code reads at %fs:0x28
    POINTER_GUARD = 0x30   # PTR_MANGLE's key


@dataclass(slots=True)
class ThreadArea:
    """One thread's TLS in ``mm``: ``tp`` (what %fs holds: the TCB), ``dtv`` (what %fs:8
    holds: the DTV's generation entry; its length is the entry before, each entry 16
    bytes), ``blocks`` (module name -> block address, static modules only) and the one
    anonymous mapping ``[start, start + length)`` holding all of it."""

    mm: Mmap
    start: int
    length: int
    tp: int
    dtv: int
    blocks: dict[str, int]

    def dtv_entry(self, module_id: int) -> int:
        """The address of module ``module_id``'s DTV entry (its pointer word)."""
        return self.dtv + module_id * _DTV_ENTRY

    def close(self) -> None:
        """Unmap the area (idempotent)."""
        if self.length:
            self.mm.munmap(self.start, self.length)
            self.length = 0

    unmap = close


def _area_layout(tls: TlsState, base: int) -> tuple[int, int]:
    """(tp, dtv) for an area mapped at ``base``, as ``_dl_allocate_tls_storage`` places
    them in its allocation: tp = the aligned start + static_size - TLS_TCB_SIZE; after the
    TCB the word glibc keeps the allocation's start in; then the DTV (16-byte aligned),
    whose generation entry follows its length entry."""
    tp = _roundup(base, tls.static_align) + tls.static_size - TLS_TCB_SIZE
    length_entry = _roundup(tp + TLS_TCB_SIZE + _WORD, _DTV_ENTRY)
    return tp, length_entry + _DTV_ENTRY


def _dtv_words(tls: TlsState, tp: int, dtv: int) -> tuple[list[int], list[int]]:
    """(addresses, values) of a fresh thread's DTV words (``allocate_dtv`` and
    ``_dl_allocate_tls_init``): its length and generation, then per module its block
    (static) or TLS_DTV_UNALLOCATED (dynamic); entries of free ids stay 0."""
    addrs = [dtv - _DTV_ENTRY, dtv]
    values = [tls.dtv_length, tls.dtv_generation]
    for mod in tls.modules:
        addrs.append(dtv + mod.module_id * _DTV_ENTRY)
        values.append(TLS_DTV_UNALLOCATED if mod.tp_offset is None else tp - mod.tp_offset)
    return addrs, values


def build_thread_area(mm: Mmap, tls: TlsState, *, stack_guard: int = 0,
                      pointer_guard: int = 0) -> ThreadArea:
    """Map (anonymous, read-write) and fill one thread's TLS as glibc's ld.so does for a
    thread it creates: each static block gets its init image (p_filesz bytes read through
    ``mm`` at p_vaddr + load bias, so the objects must be loaded and relocated) and zeros
    after it; the TCB header (self pointers, DTV, the two guards) and the DTV are written.
    The area is unmapped again when a read or write fails (MmapError, vmsim.Fault).
    ValueError before :meth:`TlsState.add_startup` (the area has no size yet)."""
    if not tls.started:
        raise ValueError("build_thread_area: TlsState.add_startup has not run")
    dtv_bytes = (tls.dtv_length + 2) * _DTV_ENTRY
    wanted = tls.static_size + tls.static_align + _WORD + _DTV_ENTRY + dtv_bytes
    length = page_round_up(wanted, mm.page_size)
    start = mm.mmap_anonymous(0, length, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE,
                              MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS)
    area = ThreadArea(mm, start, length, *_area_layout(tls, start), blocks={})
    try:
        _fill_area(area, tls, stack_guard, pointer_guard)
    except BaseException:
        area.close()
        raise
    return area


def _fill_area(area: ThreadArea, tls: TlsState, stack_guard: int, pointer_guard: int) -> None:
    """Write ``area``'s blocks, TCB header, allocation word and DTV (the mapping is zero)."""
    tp, mm = area.tp, area.mm
    for mod in tls.modules:
        if mod.tp_offset is None:
            continue
        area.blocks[mod.name] = tp - mod.tp_offset
        if mod.filesz:
            mm.write(tp - mod.tp_offset, mm.read(mod.image_vaddr + mod.load_bias, mod.filesz))
    addrs, values = _dtv_words(tls, tp, area.dtv)
    addrs += [tp + TcbHead.TCB, tp + TcbHead.DTV, tp + TcbHead.SELF, tp + TcbHead.STACK_GUARD,
              tp + TcbHead.POINTER_GUARD, tp + TLS_TCB_SIZE]
    values += [tp, area.dtv, tp, stack_guard, pointer_guard, area.start]
    mm.write_words(np.array(addrs, dtype=np.uint64), np.array(values, dtype=np.uint64))
