"""What ld.so's own start-up leaves for libc, done for an ld.so that a LinkMap maps but never
starts.

A process started by glibc runs ld.so first, and ld.so's start-up fills in state that libc
later reads: the static TLS size in ``_rtld_global_ro``, the main thread's ``struct pthread``
(its tid), the list of threads, and it calls libc's ``__libc_early_init``. Where a LinkMap is
the dynamic linker of a process whose code runs (a ``vmsim.Process``), ld.so is mapped and
relocated like any library, but its start-up never runs, and libc finds that state empty:
``pthread_rwlock_wrlock`` says EDEADLK (tid 0 looks like "the lock's writer is me": OpenSSL's
one-shot ``SHA256()`` then fails on a lock it never got), ``__libc_early_init`` divides by a
zero TLS alignment, ``isalpha`` reads a ctype table never set.

glibc meets the same problem itself when a static program dlopens libc: its
``__rtld_static_init`` writes the few fields of the new ld.so's ``_rtld_global_ro`` that libc
reads, and ``_dl_call_libc_early_init`` runs libc's early init. A :class:`RtldStart` does what
those do, plus the part of ld.so's ``__tls_init_tp`` whose layout glibc publishes:

1. :meth:`RtldStart.seed_rtld` (ld.so relocated, its RELRO not yet sealed): the static TLS
   size and alignment. Where they lie in ``_rtld_global_ro`` is private to the build of
   glibc, so ld.so's own code is asked: every word of the struct is tagged with its index,
   ld.so's exported ``_dl_get_tls_static_info`` is called, the tags it hands back name the two
   fields; the struct's bytes are put back and the two values written.
2. :meth:`RtldStart.start_thread` (the thread area built): the main thread's tid, from the
   ``set_tid_address`` syscall as ld.so does (through libc's ``syscall``), and the thread on
   ``GL(dl_stack_user)``, the lists ``dl_stack_used`` and ``dl_stack_user`` made empty first.
   These offsets are the ones glibc publishes for debuggers (libthread_db): libc's
   ``_thread_db_pthread_tid``, ``_thread_db_pthread_list``, ``_thread_db_sizeof_pthread`` and
   ``_thread_db_rtld_global__dl_stack_user`` (and ``..._used``), each three 32-bit words: the
   field's size in bits, its count, its offset.
3. :meth:`RtldStart.early_init`: ``__libc_early_init(true)`` (ctype tables,
   ``__libc_single_threaded``, the default thread stack size), before any init function, where
   ld.so calls it.

A step that cannot be done (not glibc, a layout that does not check out) is skipped and its
reason kept in ``skipped``; ``done`` lists what was written. Not done, for want of a
published layout: the auxiliary vector, hwcap and clock-tick fields (their static defaults
stay), ``GL(dl_stack_cache)``, the robust-list head, rseq registration (libc then behaves as on
a kernel without rseq), ``specific[0]`` and ``__libc_stack_end``. The link-map list
(``GL(dl_ns)``) stays empty: the LinkMap is the dynamic linker here, so libc's
``dl_iterate_phdr``, ``dladdr`` and ``dlopen`` know none of its objects.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from loader.mmap import MapFlags, Mmap, ProtFlags, Runner
from loader.tls import TLS_TCB_SIZE, TlsState

__all__ = ["RtldStart", "thread_db_field"]

Symbol = Callable[[str], "int | None"]
"""The address of a name an object defines, or None."""

SYS_SET_TID_ADDRESS = 218
_TAG = 0x7A6C_6400_0000
"""Tags are ``_TAG + word index``: values no real field of ``_rtld_global_ro`` holds."""
_LIST_T = 16
"""sizeof(list_t) on x86-64: next, prev."""


def thread_db_field(mm: Mmap, descriptor: int | None, bits: int) -> int | None:
    """The offset a libthread_db descriptor of libc publishes (three 32-bit words: size in
    bits, count, offset), when it describes one field of ``bits`` bits; else None."""
    if descriptor is None:
        return None
    size, count, offset = struct.unpack("<3I", mm.read(descriptor, 12))
    return offset if (size, count) == (bits, 1) else None


class RtldStart:
    """ld.so's start-up state for libc, written by the loader (module docstring), on a
    backend that runs code (``call``). ``done`` and ``skipped`` say what happened."""

    def __init__(self, mm: Mmap, call: Runner) -> None:
        self.mm, self.call = mm, call
        self.done: list[str] = []
        self.skipped: list[str] = []
        self.tls_sized = False
        """The static TLS size is in ``_rtld_global_ro`` (``__libc_early_init`` divides by it)."""

    def seed_rtld(self, rtld: Symbol, rtld_ro_size: int, tls: TlsState) -> None:
        """Write the static TLS size and alignment into ld.so's ``_rtld_global_ro`` (before
        its RELRO is sealed), where its ``_dl_get_tls_static_info`` reads them."""
        ro, info = rtld("_rtld_global_ro"), rtld("_dl_get_tls_static_info")
        if ro is None or info is None or rtld_ro_size < 16:
            self.skipped.append("TLS static size: ld.so exports no _rtld_global_ro or "
                                "_dl_get_tls_static_info")
            return
        fields = self._fields_read_by(info, ro, rtld_ro_size)
        if fields is None:
            self.skipped.append("TLS static size: _dl_get_tls_static_info does not read "
                                "two words of _rtld_global_ro")
            return
        for offset, value in zip(fields, (tls.static_size, tls.static_align), strict=True):
            self.mm.write(ro + offset, value.to_bytes(8, "little"))
        self.tls_sized = True
        self.done.append(f"_rtld_global_ro: dl_tls_static_size={tls.static_size} at "
                         f"+{fields[0]:#x}, dl_tls_static_align={tls.static_align} at "
                         f"+{fields[1]:#x}")

    def _fields_read_by(self, getter: int, ro: int, size: int) -> tuple[int, int] | None:
        """The offsets of the two words ``getter(&a, &b)`` copies out of the struct at ``ro``
        (``size`` bytes): each word tagged with its index, the getter called, the struct put
        back. None when what comes back is not two tags."""
        saved = self.mm.read(ro, size)
        words = size // 8
        out = self.mm.mmap_anonymous(0, 16, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE,
                                     MapFlags.MAP_PRIVATE)
        try:
            self.mm.write(ro, struct.pack(f"<{words}Q", *range(_TAG, _TAG + words)))
            self.call(getter, out, out + 8)
            got = struct.unpack("<2Q", self.mm.read(out, 16))
        finally:
            self.mm.write(ro, saved)
            self.mm.munmap(out, 16)
        index = [tag - _TAG for tag in got]
        if not all(0 <= i < words for i in index):
            return None
        return index[0] * 8, index[1] * 8

    def start_thread(self, libc: Symbol, rtld: Symbol, rtld_size: int, tp: int) -> None:
        """The main thread's tid (set_tid_address, as ld.so's ``__tls_init_tp``) and its
        place on ``GL(dl_stack_user)``, at the offsets libc publishes for libthread_db."""
        def field(name: str, bits: int) -> int | None:
            return thread_db_field(self.mm, libc(f"_thread_db_{name}"), bits)
        size_at = libc("_thread_db_sizeof_pthread")
        size = struct.unpack("<I", self.mm.read(size_at, 4))[0] if size_at else None
        tid, link = field("pthread_tid", 32), field("pthread_list", 8 * _LIST_T)
        syscall, glob = libc("syscall"), rtld("_rtld_global")
        if size != TLS_TCB_SIZE or tid is None or link is None or syscall is None \
                or tid + 4 > size or link + _LIST_T > size:
            self.skipped.append(f"main thread: libc publishes no struct pthread of "
                                f"{TLS_TCB_SIZE} bytes with a tid and a list")
            return
        value = self.call(syscall, SYS_SET_TID_ADDRESS, tp + tid) & 0xFFFF_FFFF
        self.mm.write(tp + tid, value.to_bytes(4, "little"))
        self.done.append(f"struct pthread: tid={value} at +{tid:#x}")
        used = field("rtld_global__dl_stack_used", 8 * _LIST_T)
        user = field("rtld_global__dl_stack_user", 8 * _LIST_T)
        if glob is None or used is None or user is None or \
                max(used, user) + _LIST_T > rtld_size:
            self.skipped.append("thread lists: libc publishes no dl_stack_used/user")
            return
        self._empty_list(glob + used)
        self._list_add(tp + link, glob + user)
        self.done.append(f"_rtld_global: dl_stack_used at +{used:#x} empty, dl_stack_user at "
                         f"+{user:#x} holds the main thread")

    def _empty_list(self, head: int) -> None:
        """INIT_LIST_HEAD: ``head`` points at itself both ways."""
        self.mm.write(head, struct.pack("<2Q", head, head))

    def _list_add(self, new: int, head: int) -> None:
        """glibc's list_add on an empty ``head``: the list holds ``new`` alone."""
        self.mm.write(new, struct.pack("<2Q", head, head))
        self.mm.write(head, struct.pack("<2Q", new, new))

    def early_init(self, libc: Symbol) -> None:
        """``__libc_early_init(true)``, as ld.so calls it for the libc of the initial
        namespace, once the static TLS size it reads is in place."""
        fn = libc("__libc_early_init")
        if fn is None or not self.tls_sized:
            self.skipped.append("__libc_early_init: not exported, or its TLS size not set")
            return
        self.call(fn, 1)
        self.done.append("__libc_early_init(true)")
