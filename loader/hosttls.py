"""Host TLS for the objects our loader maps into this very process.

Part of the host backend (beside ``loader.libc``; imports ``loader.mmap``, ``loader.elf``,
``loader.reloc``, ``loader.symbols``, ``loader.tables``). This process's glibc cannot be told
about the objects our loader maps, so what it would do for their TLS is done here:

- **Dynamic TLS.** Each of our TLS modules gets an id from ``MODULE_ID_BASE`` (2**32) up, a
  range glibc never reaches (its ids count the modules it has loaded). ``tls_get_addr`` is a
  native replacement of ``__tls_get_addr`` (machine code in ``_LISTING``, mapped read+exec,
  never writable and executable at once): an id below the range goes straight on to glibc's
  own ``__tls_get_addr``; for ours it calls back into Python, which keeps one block per
  (thread, module), made from the module's init image (p_filesz bytes, the rest zero) on
  first use, freed when the thread exits (a pthread key's destructor, which glibc runs after
  the thread's C++ ``thread_local`` destructors). ``tlsdesc_function`` is the TLS descriptor
  function for our modules (``-mtls-dialect=gnu2``): its argument points to a
  ``tls_index``; it returns the address minus the thread pointer, every other register kept.
  Initial-exec (TPOFF64) is refused: a block of ours would need a place in glibc's static TLS
  surplus, which glibc hands out to its own dlopen'ed objects and initialises for its threads
  with no interface for anyone else, so no place there is ours for sure
  (``check_no_initial_exec``).
- **Exceptions** are ``loader.ehframe``'s (libgcc's ``__register_frame``).

TLS variables other modules define: ``HostTls.module_of`` gives (module id, offset) from our
modules' tables first, then glibc's real ones (``glibc_tls_module``, through
``dl_iterate_phdr``); the resolver (``HostTls.resolver``) hands them to DTPMOD64, DTPOFF64
and TLS descriptors (a descriptor of glibc's TLS reaches glibc's ``__tls_get_addr`` through
the callback).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import traceback
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage
from loader.elfdefs import R_X86_64, SHN, STT, st_type
from loader.errors import ElfSegmentError, ElfUnsupportedError
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import page_round_up
from loader.reloc import TlsLayout
from loader.resident import process_objects
from loader.symbols import Finder, HostResolver, Resolution, find
from loader.tables import DynamicTables

__all__ = ["MAX_BLOCK", "MODULE_ID_BASE", "HostTls", "check_no_initial_exec",
           "glibc_tls_module"]

MODULE_ID_BASE = 1 << 32
"""Our TLS module ids start here: ``tls_get_addr`` sends a tls_index whose ti_module has a
nonzero upper half to Python, the rest to glibc."""

MAX_BLOCK = 1 << 30
"""The largest TLS block (and alignment) a module of ours may ask for: each thread that
touches it gets one."""

# The native code. Each line: its bytes, then the instruction that assembles to them (a test
# assembles the right-hand column with this machine's ``as`` and compares). The two words
# at the end are filled in before the page is sealed read+exec.
_LISTING = """
                                tls_get_addr:             # __tls_get_addr(tls_index *ti)
83 7f 04 00                         cmpl $0, 4(%rdi)      # ti_module >= 2**32: ours
75 06                               jne 1f
ff 25 d4 00 00 00                   jmp *real_tls_get_addr(%rip)   # glibc's module
e8 16 00 00 00                  1:  call save_and_call    # %rax = callback(ti)
c3                                  ret
                                tlsdesc:                  # %rax: the descriptor
57                                  push %rdi
48 8b 78 08                         mov 8(%rax), %rdi     # its argument: a tls_index *
e8 0b 00 00 00                      call save_and_call
64 48 2b 04 25 00 00 00 00          sub %fs:0, %rax       # address - thread pointer
5f                                  pop %rdi
c3                                  ret
                                save_and_call:            # %rax = callback(%rdi), all else kept
55                                  push %rbp
48 89 e5                            mov %rsp, %rbp
51                                  push %rcx             # the registers a call may change
52                                  push %rdx             # (the callee keeps the others)
56                                  push %rsi
57                                  push %rdi
41 50                               push %r8
41 51                               push %r9
41 52                               push %r10
41 53                               push %r11
48 83 e4 c0                         and $-64, %rsp        # XSAVE's alignment (callers may
48 81 ec 00 10 00 00                sub $4096, %rsp       # come misaligned: gcc PR 58066)
31 d2                               xor %edx, %edx        # clear the XSAVE header
48 89 94 24 00 02 00 00             mov %rdx, 512(%rsp)
48 89 94 24 08 02 00 00             mov %rdx, 520(%rsp)
48 89 94 24 10 02 00 00             mov %rdx, 528(%rsp)
48 89 94 24 18 02 00 00             mov %rdx, 536(%rsp)
48 89 94 24 20 02 00 00             mov %rdx, 544(%rsp)
48 89 94 24 28 02 00 00             mov %rdx, 552(%rsp)
48 89 94 24 30 02 00 00             mov %rdx, 560(%rsp)
48 89 94 24 38 02 00 00             mov %rdx, 568(%rsp)
b8 e7 00 00 00                      mov $0xe7, %eax       # x87, SSE, AVX, AVX-512 state
48 0f ae 24 24                      xsave64 (%rsp)
ff 15 44 00 00 00                   call *callback(%rip)
48 89 c6                            mov %rax, %rsi
b8 e7 00 00 00                      mov $0xe7, %eax
31 d2                               xor %edx, %edx
48 0f ae 2c 24                      xrstor64 (%rsp)
48 89 f0                            mov %rsi, %rax
48 8d 65 c0                         lea -64(%rbp), %rsp
41 5b                               pop %r11
41 5a                               pop %r10
41 59                               pop %r9
41 58                               pop %r8
5f                                  pop %rdi
5e                                  pop %rsi
5a                                  pop %rdx
59                                  pop %rcx
5d                                  pop %rbp
c3                                  ret
                                cpuid:                    # cpuid(leaf, subleaf, uint32 out[4])
53                                  push %rbx
49 89 d0                            mov %rdx, %r8
89 f8                               mov %edi, %eax
89 f1                               mov %esi, %ecx
0f a2                               cpuid
41 89 00                            mov %eax, (%r8)
41 89 58 04                         mov %ebx, 4(%r8)
41 89 48 08                         mov %ecx, 8(%r8)
41 89 50 0c                         mov %edx, 12(%r8)
5b                                  pop %rbx
c3                                  ret
0f 1f 44 00 00                      .p2align 3
                                callback:
00 00 00 00 00 00 00 00             .quad 0
                                real_tls_get_addr:
00 00 00 00 00 00 00 00             .quad 0
"""
_BYTES_COLUMN = 32
_XSAVE_AREA = 4096
_XSAVE_COMPONENTS = (2, 5, 6, 7)     # AVX, AVX-512 opmask, ZMM_Hi256, Hi16_ZMM (mask 0xe7)
_CPUID_XSAVE_LEAF, _CPUID_OSXSAVE = 0xD, 1 << 27


def listing_lines() -> list[tuple[bytes, str]]:
    """``_LISTING`` as (bytes, instruction or label) per line, comments dropped."""
    out = []
    for line in _LISTING.strip("\n").splitlines():
        code = bytes.fromhex(line[:_BYTES_COLUMN])
        out.append((code, line[_BYTES_COLUMN:].split("#")[0].strip()))
    return out


def _assemble() -> tuple[bytes, dict[str, int]]:
    """The machine code and each label's offset in it."""
    code, labels = b"", {}
    for chunk, text in listing_lines():
        if text.endswith(":"):
            labels[text[:-1]] = len(code)
        code += chunk
    return code, labels


CODE, LABELS = _assemble()

_LIBC = ctypes.CDLL(None)
_LIBC.aligned_alloc.restype, _LIBC.aligned_alloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t,
                                                                             ctypes.c_size_t]
_LIBC.free.argtypes = [ctypes.c_void_p]
_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_LIBC.pthread_key_create.argtypes = [ctypes.POINTER(ctypes.c_uint), _DESTRUCTOR]
_LIBC.pthread_setspecific.argtypes = [ctypes.c_uint, ctypes.c_void_p]
_LIBC.pthread_key_delete.argtypes = [ctypes.c_uint]
_LOOKUP = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)
_CPUID = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
_TlsIndex = ctypes.c_uint64 * 2


def _glibc_tls_get_addr() -> int:
    """glibc's own ``__tls_get_addr`` (ld.so's)."""
    found = HostResolver().scope("__tls_get_addr", None)
    if found is None:
        raise ElfUnsupportedError("__tls_get_addr", None, "defined in this process (ld.so)")
    return found


def _map_code(mm: Mmap, words: dict[str, int]) -> tuple[int, int]:
    """Map ``CODE`` with ``words`` (label -> value) filled in, read+exec; (address, length)."""
    length = page_round_up(len(CODE), mm.page_size)
    rw = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
    at = mm.mmap_anonymous(0, length, rw, MapFlags.MAP_PRIVATE)
    try:
        code = bytearray(CODE)
        for label, value in words.items():
            code[LABELS[label]: LABELS[label] + 8] = value.to_bytes(8, "little")
        mm.write(at, bytes(code))
        mm.mprotect(at, length, ProtFlags.PROT_READ | ProtFlags.PROT_EXEC)
    except BaseException:
        mm.munmap(at, length)
        raise
    return at, length


def _check_xsave(cpuid_at: int) -> None:
    """``save_and_call`` keeps the vector state with XSAVE in a 4 KiB area: the OS must
    have enabled XSAVE and each saved component must end inside the area.
    ElfUnsupportedError otherwise (no call into the native code is then made)."""
    regs = (ctypes.c_uint32 * 4)()
    cpuid = _CPUID(cpuid_at)
    cpuid(1, 0, ctypes.addressof(regs))
    if not regs[2] & _CPUID_OSXSAVE:
        raise ElfUnsupportedError("CPUID.1:ECX.OSXSAVE", 0, "1 (XSAVE enabled by the OS)")
    for component in _XSAVE_COMPONENTS:
        cpuid(_CPUID_XSAVE_LEAF, component, ctypes.addressof(regs))
        size, offset = regs[0], regs[1]
        if offset + size > _XSAVE_AREA:
            raise ElfUnsupportedError(f"XSAVE component {component} end", offset + size,
                                      f"within the {_XSAVE_AREA}-byte save area")


@dataclass(frozen=True, slots=True)
class _Module:
    """One of our TLS modules: its init image's vaddr, sizes and alignment, the load bias
    once it is placed (None before), the object's tables when its exports are looked up."""

    vaddr: int
    filesz: int
    memsz: int
    align: int
    bias: int | None = None
    tables: DynamicTables | None = None


class HostTls:
    """Dynamic TLS for the objects our loader maps into this process (module docstring).

    Usage, for a process image that maps before it relocates: ``tls = HostTls(mm)``; per
    object, ``layout = tls.add_module(image, bias)``, then relocate with ``tls=layout`` and
    ``tls.find`` among the resolver's ``pre_find`` hooks (``tls.resolver()``). With
    ``loader.load``, which maps, relocates and runs init in one call::

        layout = tls.add_module(image)          # image: loader.elf.parse_image(...)
        obj = loader.load(path, mm, resolver=tls.resolver(layout), tls=layout)

    (the resolver places the module when relocation starts; an object that imports
    nothing is placed by hand, ``tls.place(layout.module_id, obj.load_bias)``, before any
    thread touches its TLS). ``tls.remove_module(layout.module_id)`` when it is unloaded;
    ``tls.close()`` last. Every thread gets its own block of each module on first use.
    Keep the HostTls referenced until ``close``: the native code calls into it.
    """

    def __init__(self, mm: Mmap) -> None:
        self.mm = mm
        self._lock = threading.Lock()
        self._modules: dict[int, _Module] = {}
        self._blocks: dict[int, dict[int, int]] = {}        # thread -> module -> block
        self._indices: dict[int, dict[int, Any]] = {}       # module -> offset -> tls_index
        self._next_id = MODULE_ID_BASE
        self._lookup = _LOOKUP(self._on_lookup)
        real = _glibc_tls_get_addr()
        self._glibc_lookup = _LOOKUP(real)
        callback = ctypes.cast(self._lookup, ctypes.c_void_p).value or 0
        self.code, self._code_length = _map_code(mm, {"callback": callback,
                                                      "real_tls_get_addr": real})
        self.tls_get_addr = self.code + LABELS["tls_get_addr"]
        self.tlsdesc_function = self.code + LABELS["tlsdesc"]
        self._on_exit = _DESTRUCTOR(self._on_thread_exit)
        key = ctypes.c_uint()
        try:
            _check_xsave(self.code + LABELS["cpuid"])
            if _LIBC.pthread_key_create(ctypes.byref(key), self._on_exit):
                raise OSError("pthread_key_create failed")
        except BaseException:
            mm.munmap(self.code, self._code_length)
            raise
        self._key: int | None = key.value

    def find(self, name: str, version: str | None) -> int | None:
        """A resolver hook (``Finder``): ``__tls_get_addr`` binds to ``tls_get_addr``."""
        return self.tls_get_addr if name == "__tls_get_addr" else None

    def resolver(self, layout: TlsLayout | None = None) -> HostResolver:
        """This process's scope, with ``__tls_get_addr`` bound to ours and the module ids
        of glibc's TLS modules for DTPMOD64 against their variables. With ``layout`` (a
        module added without its bias), the resolver also places that module at the bias
        the relocation pass resolves with: after mapping, before any init function runs.
        (``loader.load`` takes ``base`` but says the bias only when it returns.)"""
        hook: Finder = self.find
        if layout is None:
            return _TlsResolver(self, [hook])
        return _PlacingResolver(self, layout.module_id, [hook])

    def add_module(self, image: ElfImage, bias: int | None = None, *,
                   tables: DynamicTables | None = None) -> TlsLayout:
        """A new module for ``image``'s PT_TLS, its init image at ``bias`` + p_vaddr (the
        bytes there when a thread first touches the block: relocated ones); ``bias`` None:
        given later (``place``). With ``tables`` (the object's), the TLS variables it
        exports are found by ``module_of``. Returns the layout ``loader.load(..., tls=)``
        takes: dynamic TLS, descriptors of ours. ElfSegmentError without PT_TLS."""
        seg = image.tls
        if seg is None:
            raise ElfSegmentError("PT_TLS", None, "a PT_TLS header (the object has no TLS)")
        if seg.p_memsz > MAX_BLOCK or seg.p_align > MAX_BLOCK:
            raise ElfSegmentError("PT_TLS p_memsz, p_align", (seg.p_memsz, seg.p_align),
                                  f"each at most {MAX_BLOCK:#x} (a block per thread)")
        with self._lock:
            module_id, self._next_id = self._next_id, self._next_id + 1
            self._modules[module_id] = _Module(seg.p_vaddr, seg.p_filesz, seg.p_memsz,
                                               max(seg.p_align, 16), bias, tables)
            self._indices[module_id] = {}
        return TlsLayout(module_id, None, self.descriptor)

    def module_of(self, name: str, version: str | None) -> tuple[int, int] | None:
        """(module id, offset in its block) of the TLS variable name[@version]: in the
        first module of ours added with ``tables`` that exports it, else in glibc's
        (``glibc_tls_module``); None when neither defines it."""
        query = f"{name}@{version}" if version else name
        for module_id, module in list(self._modules.items()):
            i = None if module.tables is None else find(module.tables, query)
            if i is not None and module.tables is not None:
                sym = module.tables.symtab[i]
                if st_type(int(sym["st_info"])) == int(STT.TLS):
                    return module_id, int(sym["st_value"])
        return glibc_tls_module(name, version)

    def place(self, module_id: int, bias: int) -> None:
        """Module ``module_id``'s object is loaded at ``bias``: blocks can now be made.
        A thread that touches a module before it is placed aborts the process."""
        with self._lock:
            self._modules[module_id] = replace(self._modules[module_id], bias=bias)

    def remove_module(self, module_id: int) -> None:
        """Forget module ``module_id`` and free every thread's block of it."""
        with self._lock:
            self._modules.pop(module_id, None)
            self._indices.pop(module_id, None)
            for thread, blocks in list(self._blocks.items()):
                block = blocks.pop(module_id, None)
                if block is not None:
                    _LIBC.free(block)
                if not blocks:
                    del self._blocks[thread]

    def close(self) -> None:
        """Free every block, delete the thread key, unmap the code (nothing may call it
        after this). A second call does nothing."""
        if self._key is None:
            return
        for module_id in list(self._modules):
            self.remove_module(module_id)
        _LIBC.pthread_key_delete(self._key)
        self._key = None
        self.mm.munmap(self.code, self._code_length)

    def block(self, module_id: int) -> int:
        """This thread's block of module ``module_id``, made on first use (KeyError for a
        module it does not know)."""
        thread = threading.get_ident()
        with self._lock:
            blocks = self._blocks.setdefault(thread, {})
            if module_id not in blocks:
                if not blocks:
                    _LIBC.pthread_setspecific(self._key, 1)   # the exit destructor frees them
                blocks[module_id] = _new_block(self._modules[module_id])
            return blocks[module_id]

    def threads_with_blocks(self) -> int:
        """How many threads hold blocks now (an exited thread's are freed)."""
        with self._lock:
            return len(self._blocks)

    def descriptor(self, module_id: int, offset: int) -> tuple[int, int]:
        """The (function, argument) words of a TLS descriptor of ``offset`` in module
        ``module_id`` (ours or glibc's): our descriptor function and a tls_index
        {module, offset}, kept until the module is removed (glibc's: until ``close``)."""
        with self._lock:
            indices = self._indices.setdefault(module_id, {})
            if offset not in indices:
                indices[offset] = _TlsIndex(module_id, offset)
            return self.tlsdesc_function, ctypes.addressof(indices[offset])

    def _on_lookup(self, ti: int) -> int:
        """The native code's callback: the address of a tls_index's variable in this
        thread. An error here cannot be raised into C: it is printed and the process
        aborts, rather than returning an address that is wrong."""
        try:
            module_id, offset = _TlsIndex.from_address(ti)
            if module_id < MODULE_ID_BASE:         # a descriptor of glibc's TLS
                return int(self._glibc_lookup(ti))
            return self.block(module_id) + offset
        except BaseException:
            traceback.print_exc()
            sys.stderr.write(f"loader.hosttls: no TLS block for tls_index at {ti:#x}\n")
            sys.stderr.flush()
            os.abort()

    def _on_thread_exit(self, _value: int | None) -> None:
        """The thread key's destructor: free the exiting thread's blocks."""
        with self._lock:
            for block in self._blocks.pop(threading.get_ident(), {}).values():
                _LIBC.free(block)


class _TlsResolver(HostResolver):
    """``HostTls.resolver()``: this process's scope; TLS variables of other modules (ours,
    then glibc's) have their module id and offset (``HostTls.module_of``), for DTPMOD64,
    DTPOFF64 and TLS descriptors."""

    def __init__(self, tls: HostTls, pre_find: list[Finder]) -> None:
        super().__init__(pre_find)
        self.tls = tls

    def scope_tls_module(self, name: str, version: str | None) -> tuple[int, int] | None:
        """``HostTls.module_of(name, version)``."""
        return self.tls.module_of(name, version)


class _PlacingResolver(_TlsResolver):
    """``HostTls.resolver(layout)``: places the module when the relocation pass asks."""

    def __init__(self, tls: HostTls, module_id: int, pre_find: list[Finder]) -> None:
        super().__init__(tls, pre_find)
        self.module_id = module_id

    def resolve(self, tables: DynamicTables, needed: npt.NDArray[np.int64], bias: int,
                mm: Mmap, near: int,
                not_self: npt.NDArray[np.int64] | None = None) -> Resolution:
        """Place the module at ``bias``, then resolve as the host does."""
        self.tls.place(self.module_id, bias)
        return super().resolve(tables, needed, bias, mm, near, not_self)


def _new_block(module: _Module) -> int:
    """A block for ``module``: aligned, the init image then zeros. LookupError when the
    module is not placed yet."""
    if module.bias is None:
        raise LookupError("a TLS block of a module not placed yet (HostTls.place)")
    size = max(-(-module.memsz // module.align) * module.align, module.align)
    block = _LIBC.aligned_alloc(module.align, size)
    if not block:
        raise MemoryError(f"aligned_alloc({module.align}, {size}) failed")
    ctypes.memmove(block, module.bias + module.vaddr, module.filesz)
    ctypes.memset(block + module.filesz, 0, size - module.filesz)
    return int(block)


_INITIAL_EXEC = (int(R_X86_64.TPOFF64),)


def check_no_initial_exec(tables: DynamicTables, name: str) -> None:
    """Refuse an object whose relocations reach its own TLS through the initial-exec model
    (a TPOFF relocation against symbol 0 or a TLS symbol it defines): ElfUnsupportedError
    naming the object (``name``). Our modules have dynamic TLS only (module docstring)."""
    syms = tables.symtab
    for table in tables.relocs:
        ie = np.isin(table.r_type, _INITIAL_EXEC)
        sym = table.r_sym[ie]
        own = (sym == 0) | ((syms["st_shndx"][sym] != int(SHN.UNDEF))
                            & (st_type(syms["st_info"][sym]) == int(STT.TLS)))
        if own.any():
            raise ElfUnsupportedError(
                f"{name}: {table.name} initial-exec TLS relocations", int(own.sum()),
                "none on the host: its TLS is dynamic (a block in glibc's static TLS surplus "
                "cannot be reserved from outside glibc); build it without "
                "-ftls-model=initial-exec")


# ---------------------------------------------------------------------------------------------
# glibc's own TLS modules

def glibc_tls_module(name: str, version: str | None = None) -> tuple[int, int] | None:
    """(module id, offset in its block) of the TLS variable ``name`` as an object glibc
    loaded defines it: what DTPMOD64 and DTPOFF64 against it hold. The module is the one
    whose block, in this thread (``dl_iterate_phdr``'s ``dlpi_tls_data``), holds the
    address dlsym gives. None when this process does not define ``name``."""
    addr = HostResolver().scope(name, version)
    if addr is None:
        return None
    for obj in process_objects():
        if obj.tls_modid and obj.tls_data <= addr < obj.tls_data + obj.tls_memsz:
            return obj.tls_modid, addr - obj.tls_data
    return None
