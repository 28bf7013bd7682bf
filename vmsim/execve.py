"""execve as Linux's binfmt_elf does it: the program's PT_LOADs and its interpreter's mapped
into a process's space, the program break placed, and the initial stack built (argc, the
argv and envp pointers, the auxiliary vector, the strings they point to).

Part of ``vmsim``'s process layer, used by ``vmsim.process`` (``Process.exec``). The mapping
is ``loader.pipeline.map_object``: the loader maps, but relocates nothing and runs nothing (a
static-pie program and ld.so relocate themselves, and ld.so loads the rest).

Where things go, as Linux 6.x places them without address randomization (``setarch -R``):
an ET_EXEC at its own addresses; an ET_DYN with a PT_INTERP at ``ELF_ET_DYN_BASE``
(rounded down to its largest p_align); a static-pie (ET_DYN, no PT_INTERP) and the
interpreter wherever mmap puts them (top-down from the mmap base). The break starts at the
page after the program's last byte, but a static-pie's at the page after ELF_ET_DYN_BASE
(Linux 6.10 and later move it out of the mmap area, randomizing or not).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import numpy as np

from loader.elf import ElfImage, FileBytes, parse_image
from loader.elfdefs import EHDR_DTYPE, ET, PF, PHDR_DTYPE
from loader.errors import ElfSegmentError
from loader.pages import page_round_up
from loader.pipeline import LoadedObject, map_object
from loader.trace import TracingMmap
from vmsim.space import AddressSpace

__all__ = ["AT", "ELF_ET_DYN_BASE", "Image", "InitialStack", "Loaded", "auxv", "brk_start",
           "build_stack", "check_arg_max", "load_program", "map_image"]

ELF_ET_DYN_BASE = 0x5555_5555_4AAA
"""Linux x86-64's ELF_ET_DYN_BASE (2/3 of the 47-bit user window): a PIE program with an
interpreter goes there, rounded down to its alignment; a static-pie's break starts at the
page after it."""
PLATFORM = b"x86_64"
WORD = 8
_PATH_MAX = 4096
_STACK_ALIGN = 16


class AT:
    """The auxiliary vector's keys (``<elf.h>``) that exec writes."""

    NULL, PHDR, PHENT, PHNUM, PAGESZ, BASE, FLAGS, ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
    UID, EUID, GID, EGID, PLATFORM, HWCAP, CLKTCK = 11, 12, 13, 14, 15, 16, 17
    SECURE, RANDOM, HWCAP2, RSEQ_FEATURE_SIZE, RSEQ_ALIGN, EXECFN = 23, 25, 26, 27, 28, 31


ARG_MAX = (8 << 20) // 4
"""The most stack exec's strings and tables may take: a quarter of the stack (Linux's rule,
for the default 8 MiB stack limit)."""
RSEQ_FEATURE_SIZE, RSEQ_ALIGN = 28, 32
"""AT_RSEQ_FEATURE_SIZE and AT_RSEQ_ALIGN: offsetof(struct rseq, end) and its alignment
(Linux 6.3 to 6.18); the rseq syscall checks an area against them."""
CLOCK_TICKS = 100
"""AT_CLKTCK: Linux's USER_HZ."""


@dataclass(frozen=True)
class Image:
    """A program mapped by :func:`map_image`: its ``entry`` (relocated), where its program
    headers are in memory (``phdr``, ``phnum``), its ``load_bias``, ``end`` (its last byte
    in memory, exclusive: the break starts at the page after) and ``interp``, the path of
    its PT_INTERP, or None. ``obj`` is the loader's record of the mapping."""

    obj: LoadedObject
    entry: int
    phdr: int
    phnum: int
    load_bias: int
    end: int
    interp: str | None


def _header(image: ElfImage) -> dict[str, int]:
    """The ELF header's fields (the loader has checked them)."""
    row = np.frombuffer(image.read(0, EHDR_DTYPE.itemsize), dtype=EHDR_DTYPE, count=1)[0]
    return dict(zip(EHDR_DTYPE.names or (), row.tolist(), strict=True))


def _interp_path(image: ElfImage) -> str | None:
    """The path PT_INTERP names (up to its first NUL), or None without one. Raises
    ElfSegmentError for one Linux refuses (ENOEXEC): under 2 or over PATH_MAX bytes."""
    seg = image.interp
    if seg is None:
        return None
    if not 2 <= seg.p_filesz <= _PATH_MAX:
        raise ElfSegmentError("PT_INTERP p_filesz", seg.p_filesz,
                              f"2 to PATH_MAX ({_PATH_MAX}) bytes, as Linux's execve takes")
    raw = bytes(image.read(seg.p_offset, seg.p_filesz))
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _phdr_vaddr(image: ElfImage, phoff: int) -> int:
    """The unrelocated address of the program header table: where the PT_LOAD holding file
    offset ``phoff`` maps it (Linux's rule; 0 when no PT_LOAD holds it)."""
    for seg in image.loads:
        if seg.p_offset <= phoff < seg.p_offset + seg.p_filesz:
            return seg.p_vaddr + (phoff - seg.p_offset)
    return 0


def _base_for(image: ElfImage, is_program: bool) -> int | None:
    """Where exec puts the object's lowest PT_LOAD (None: where mmap puts it; see the module
    docstring)."""
    if image.e_type != ET.DYN or not is_program or image.interp is None:
        return None
    align = max([image.page_size, *(seg.p_align for seg in image.loads)])
    return ELF_ET_DYN_BASE & -align


def _headers(path: str | os.PathLike[str], page_size: int) -> tuple[ElfImage, str | None]:
    """The checked ELF and program headers of the file at ``path`` and its PT_INTERP path
    (an ElfError kind when the loader refuses them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        image = parse_image(FileBytes(fd, os.fstat(fd).st_size, os.fspath(path)), page_size)
        return image, _interp_path(image)
    finally:
        os.close(fd)


def _pad_zero(space: AddressSpace, obj: LoadedObject) -> None:
    """Zero the rest of the page after each writable PT_LOAD's .bss end, as Linux's padzero
    does (the loader, like glibc's ld.so, zeroes only up to p_memsz and leaves the file's
    bytes past it): ld.so's first allocations take that page's rest past its ``_end``.
    (Never into a next PT_LOAD that starts in the same page.)"""
    loads = obj.image.loads
    for seg, after in zip(loads, [*loads[1:], None], strict=True):
        if seg.p_memsz > seg.p_filesz and seg.p_flags & PF.W:
            start = seg.p_vaddr + seg.p_memsz
            end = page_round_up(start, space.page_size)
            end = end if after is None else min(end, after.p_vaddr)  # not into the next one
            space.write(start + obj.load_bias, bytes(max(end - start, 0)))


def map_image(space: AddressSpace, path: str | os.PathLike[str], *,
              is_program: bool) -> Image:
    """Map ``path``'s PT_LOADs into ``space`` as exec does (the program when
    ``is_program``, else its interpreter): mapped and protected, not relocated. Raises
    an ElfError kind for a file the loader refuses, MmapError when the space refuses."""
    headers, interp = _headers(path, space.page_size)
    base = _base_for(headers, is_program)
    obj = map_object(path, TracingMmap(space), base=base, host_tls=True)
    try:
        _pad_zero(space, obj)
        image, bias = obj.image, obj.load_bias
        hdr = _header(image)
        end = max(seg.p_vaddr + seg.p_memsz for seg in image.loads) + bias
        return Image(obj, image.e_entry + bias, _phdr_vaddr(image, hdr["e_phoff"]) + bias,
                     hdr["e_phnum"], bias, end, interp)
    finally:
        obj.close_file()


def auxv(program: Image, interp_base: int, page_size: int) -> list[tuple[int, int]]:
    """The auxiliary vector in Linux's order, without the entries that point into the stack
    (AT_RANDOM, AT_EXECFN, AT_PLATFORM: :func:`build_stack` adds them) and without AT_NULL.
    AT_HWCAP and AT_HWCAP2 are 0 (glibc asks the CPU itself, with cpuid); there is no vDSO
    (no AT_SYSINFO_EHDR)."""
    return [(AT.HWCAP, 0), (AT.PAGESZ, page_size), (AT.CLKTCK, CLOCK_TICKS),
            (AT.PHDR, program.phdr), (AT.PHENT, PHDR_DTYPE.itemsize), (AT.PHNUM, program.phnum),
            (AT.BASE, interp_base), (AT.FLAGS, 0), (AT.ENTRY, program.entry),
            (AT.UID, os.getuid()), (AT.EUID, os.geteuid()), (AT.GID, os.getgid()),
            (AT.EGID, os.getegid()), (AT.SECURE, 0)]


@dataclass(frozen=True)
class InitialStack:
    """What :func:`build_stack` wrote: ``sp`` (16-aligned, at argc) and the addresses the
    vector points into the strings area with (``random``, ``execfn``, ``platform``)."""

    sp: int
    random: int
    execfn: int
    platform: int
    auxv: list[tuple[int, int]]


def _words(values: list[int]) -> bytes:
    """``values`` as little-endian 64-bit words."""
    return b"".join(v.to_bytes(WORD, "little") for v in values)


_AUX_ROOM = 64 * WORD
"""Room for argc, the NULLs, the auxiliary vector and the random and platform bytes."""


def check_arg_max(strings: list[bytes], arg_max: int) -> None:
    """Raise OSError(E2BIG) when ``strings`` (argv, envp and the file name), their pointers
    and the vector need more than ``arg_max`` bytes of stack."""
    need = sum(len(s) + 1 + WORD for s in strings) + _AUX_ROOM
    if need > arg_max:
        raise OSError(errno.E2BIG, f"argv and envp need {need} bytes of stack, more than "
                      f"ARG_MAX ({arg_max}: a quarter of the stack, as Linux allows)")


def build_stack(space: AddressSpace, top: int, argv: list[bytes], envp: list[bytes],
                execfn: bytes, aux: list[tuple[int, int]], random: bytes, *,
                arg_max: int = ARG_MAX) -> InitialStack:
    """Write the initial stack below ``top`` as Linux's exec and create_elf_tables do: at
    the top a zero word, below it the strings (argv's first, lowest; then envp's; then
    ``execfn``), then 16-aligned the platform string and the 16 ``random`` bytes, then the
    table: argc, argv pointers, NULL, envp pointers, NULL, ``aux`` with AT_RANDOM,
    AT_HWCAP2 (0), AT_EXECFN, AT_PLATFORM, the rseq area's size and alignment (Linux 6.3
    and later) and AT_NULL appended; its start 16-aligned.
    Raises OSError(E2BIG), nothing written, when it all needs more than ``arg_max`` bytes."""
    check_arg_max([*argv, *envp, execfn], arg_max)
    strings = [s + b"\0" for s in (*argv, *envp, execfn)]
    area = b"".join(strings)
    at = top - WORD - len(area)
    space.write(at, area + bytes(WORD))
    pointers = [at + sum(map(len, strings[:k])) for k in range(len(strings))]
    p = at & -_STACK_ALIGN
    platform = p - len(PLATFORM) - 1
    rand = platform - len(random)
    space.write(rand, random + PLATFORM + b"\0")
    full = [*aux, (AT.RANDOM, rand), (AT.HWCAP2, 0), (AT.EXECFN, pointers[-1]),
            (AT.PLATFORM, platform), (AT.RSEQ_FEATURE_SIZE, RSEQ_FEATURE_SIZE),
            (AT.RSEQ_ALIGN, RSEQ_ALIGN), (AT.NULL, 0)]
    table = [len(argv), *pointers[:len(argv)], 0, *pointers[len(argv):-1], 0,
             *(v for pair in full for v in pair)]
    sp = (rand - WORD * len(table)) & -_STACK_ALIGN
    space.write(sp, _words(table))
    return InitialStack(sp, rand, pointers[-1], platform, full)


def brk_start(program: Image, page_size: int) -> int:
    """Where the program break starts: the page after the program's last byte; a
    static-pie's, the page after ELF_ET_DYN_BASE (see the module docstring)."""
    static_pie = program.obj.image.e_type == ET.DYN and program.interp is None
    return page_round_up(ELF_ET_DYN_BASE if static_pie else program.end, page_size)


@dataclass(frozen=True)
class Loaded:
    """An exec'ed program ready to run: the ``program``, its ``interp`` (None for a static
    program), the initial ``stack`` and ``start``, where the CPU begins (the interpreter's
    entry when there is one, else the program's)."""

    program: Image
    interp: Image | None
    stack: InitialStack
    start: int


def load_program(space: AddressSpace, top: int, path: str | os.PathLike[str],
                 argv: list[str], env: dict[str, str], *, arg_max: int = ARG_MAX) -> Loaded:
    """What execve does before the first instruction: the program and its PT_INTERP mapped
    (:func:`map_image`), the initial stack built below ``top`` (:func:`build_stack`, with
    ``argv``, ``env`` as ``NAME=value`` strings, ``path`` as AT_EXECFN, 16 host random
    bytes as AT_RANDOM; OSError(E2BIG) past ``arg_max`` bytes, before anything is mapped)."""
    argv_b = [os.fsencode(a) for a in argv]
    envp_b = [os.fsencode(f"{k}={v}") for k, v in env.items()]
    execfn = os.fsencode(os.fspath(path))
    check_arg_max([*argv_b, *envp_b, execfn], arg_max)
    program = map_image(space, path, is_program=True)
    interp = None if program.interp is None else \
        map_image(space, program.interp, is_program=False)
    aux = auxv(program, 0 if interp is None else interp.load_bias, space.page_size)
    stack = build_stack(space, top, argv_b, envp_b, execfn, aux, os.urandom(16),
                        arg_max=arg_max)
    return Loaded(program, interp, stack, program.entry if interp is None else interp.entry)
