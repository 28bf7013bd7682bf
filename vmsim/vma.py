"""The kernel layer's VMAs: :class:`Vma` records, the free-gap index, and :class:`VmaMap`,
the sorted set of a process's VMAs with the edits that split and merge them.

Part of ``vmsim``'s kernel layer, used by ``vmsim.kernel``; imports ``loader.mmap`` and
``vmsim.files`` (a VMA holds a use of its file).

A :class:`Vma` carries what Linux's ``vm_area_struct`` carries that decides merging: the
``vm_flags`` word (protection, shared, VM_ACCOUNT, VM_NORESERVE, ...), the file (the *open
file*, not the path: a dup'd fd is the same :class:`~vmsim.files.OpenFile`, a second open()
is not), the page offset, and the ``anon_vma`` (the history of private pages written, an
integer token).
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator

from loader.mmap import MmapError, ProtFlags, Region
from vmsim.files import FileTable, OpenFile, Shmem

__all__ = ["VM_ACCESS", "VM_ACCOUNT", "VM_DROPPABLE", "VM_EXEC", "VM_GROWSDOWN", "VM_LOCKED",
           "VM_MAYEXEC", "VM_MAYREAD", "VM_MAYSHARE", "VM_MAYWRITE", "VM_NOHUGEPAGE",
           "VM_NORESERVE", "VM_READ", "VM_SHARED", "VM_WRITE", "GapIndex", "Vma", "VmaMap",
           "mergeable"]

# vm_flags bits, with the kernel's values (include/linux/mm.h)
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAYSHARE = 0x80
VM_GROWSDOWN = 0x100
VM_LOCKED = 0x2000
VM_ACCOUNT = 0x100000
VM_NORESERVE = 0x200000
VM_NOHUGEPAGE = 0x40000000
VM_DROPPABLE = 1 << 40
VM_ACCESS = VM_READ | VM_WRITE | VM_EXEC

_PROTS = [ProtFlags(p) for p in range(8)]


class Vma:
    """One mapping ``[start, end)``: ``flags`` (vm_flags), ``pgoff`` (file page of ``start``;
    for private anonymous memory ``start >> page_shift`` as Linux sets it), ``file``
    (OpenFile, Shmem or None) and ``anon`` (anon_vma token, 0 when never written)."""

    __slots__ = ("anon", "end", "file", "flags", "pgoff", "start")

    def __init__(self, start: int, end: int, flags: int, pgoff: int,
                 file: OpenFile | Shmem | None, anon: int) -> None:
        self.start = start
        self.end = end
        self.flags = flags
        self.pgoff = pgoff
        self.file = file
        self.anon = anon

    def __repr__(self) -> str:
        return (f"Vma({self.start:#x}-{self.end:#x} flags={self.flags:#x} pgoff={self.pgoff:#x}"
                f" file={type(self.file).__name__} anon={self.anon})")


class GapIndex:
    """The free gaps between VMAs, bucketed by size class (floor(log2(size))), each bucket a
    sorted list of gap end addresses. Top-down placement asks each non-empty bucket that can
    hold the length for its highest gap below a limit: O(buckets * log n), flat in the
    number of mappings (Linux keeps the largest gap per subtree of its maple tree instead).
    """

    def __init__(self) -> None:
        self.ends: dict[int, list[int]] = {}  # by size class, made when first used
        self.start_of: dict[int, int] = {}
        self.mask = 0

    def add(self, start: int, end: int) -> None:
        """Record the free gap ``[start, end)`` (ignored when empty)."""
        if end > start:
            k = (end - start).bit_length() - 1
            insort(self.ends.setdefault(k, []), end)
            self.start_of[end] = start
            self.mask |= 1 << k

    def remove(self, start: int, end: int) -> None:
        """Forget the free gap ``[start, end)``, which must have been added."""
        if end > start:
            k = (end - start).bit_length() - 1
            bucket = self.ends[k]
            del bucket[bisect_left(bucket, end)]
            del self.start_of[end]
            if not bucket:
                self.mask &= ~(1 << k)

    def move_end(self, start: int, old_end: int, new_end: int) -> None:
        """The free gap ``[start, old_end)`` now ends at ``new_end``; no other gap may end
        between the two. :meth:`remove` then :meth:`add`, with a fast path for what a
        top-down mmap and its munmap do to the gap below them: when the size class stays,
        the end is replaced in place (the bucket stays sorted, no other end lying between),
        one bisection where the pair costs two and an insertion."""
        k = (old_end - start).bit_length() - 1
        if start >= min(old_end, new_end) or (new_end - start).bit_length() - 1 != k:
            self.remove(start, old_end)
            self.add(start, new_end)
            return
        bucket = self.ends[k]
        bucket[bisect_left(bucket, old_end)] = new_end
        del self.start_of[old_end]
        self.start_of[new_end] = start

    def highest(self, length: int, low: int, high: int) -> int:
        """The highest end of a free range of ``length`` bytes in ``[low, high)``, or -1:
        ``high`` itself when the gap holding it (or ending at it) has room below it, else
        the highest gap end ``e < high`` of a gap holding ``length`` bytes above ``low``.

        The gap straddling ``high`` is found here, where each bucket's bisection points at
        it (the first end past ``high`` of its bucket, no gap can lie between), so that
        top-down placement needs no bisection of the VMAs of its own."""
        best = -1
        mask = self.mask >> (length.bit_length() - 1) << (length.bit_length() - 1)
        start_of = self.start_of
        while mask:
            bit = mask & -mask
            mask ^= bit
            k = bit.bit_length() - 1
            bucket = self.ends[k]
            j = bisect_right(bucket, high) - 1
            if j + 1 < len(bucket) and start_of[bucket[j + 1]] < high:
                if high - max(start_of[bucket[j + 1]], low) >= length:
                    return high  # the straddling gap: nothing can end higher
            while j >= 0 and bucket[j] > best:
                end = bucket[j]
                start = start_of[end]
                if end - max(start, low) >= length:
                    best = end
                    break
                if bit >= length or start < low:
                    break  # lower gaps of this bucket fit no better
                j -= 1
        return best


def mergeable(a: Vma, b: Vma, shift: int) -> bool:
    """True when ``b`` follows ``a`` and vma_merge would join them: adjacent, same flags and
    open file, consecutive file pages, compatible anon_vmas (either never written, or one)."""
    return (a.end == b.start and a.flags == b.flags and a.file is b.file
            and a.pgoff + ((a.end - a.start) >> shift) == b.pgoff
            and (not a.anon or not b.anon or a.anon == b.anon))


class VmaMap:
    """A process's VMAs in address order (Linux's maple tree of ``vm_area_struct``), indexed
    ``0..len-1`` from the lowest, with the free-gap index and the files' use counts kept in
    step by :meth:`replace`, through which every change goes.

    Finding a VMA is a bisect over the start addresses. They are stored highest first (a
    list of VMAs and a parallel list of negated starts), so that top-down placement, which
    puts each new VMA below all others, appends to the end of the Python lists instead of
    inserting at their front: an mmap+munmap pair stays O(log n) as regions grow.
    """

    def __init__(self, page_shift: int, task_size: int, files: FileTable,
                 max_map_count: int) -> None:
        self.shift = page_shift
        self.task_size = task_size
        self.files = files
        self.max_map_count = max_map_count
        self.gaps = GapIndex()
        self.gaps.add(0, task_size)
        self.unmerged_possible = False
        """Set once a split failed at max_map_count: Linux can then leave mergeable
        neighbours apart (vmsim.invariants stops asserting that it does not)."""
        self._store: list[Vma] = []
        self._neg: list[int] = []

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> Vma:
        """The VMA of index ``i`` (0 the lowest; ``~i`` counts from the store's end);
        negative indices are not supported."""
        return self._store[~i]

    def __iter__(self) -> Iterator[Vma]:
        return reversed(self._store)

    def starts_consistent(self) -> bool:
        """True when the bisect keys match the VMAs (for invariant checks)."""
        return self._neg == [-v.start for v in self._store]

    def first_ending_after(self, addr: int) -> int:
        """Index of the first VMA with ``end > addr`` (len when none)."""
        store = self._store
        j = bisect_left(self._neg, -addr)  # store[j] is the highest VMA starting <= addr
        if j < len(store) and store[j].end > addr:
            return len(store) - 1 - j
        return len(store) - j

    def find(self, addr: int) -> tuple[int, Vma | None]:
        """The first VMA with ``end > addr`` and its index (None and len when none)."""
        i = self.first_ending_after(addr)
        return i, (self._store[~i] if i < len(self._store) else None)

    def count_below(self, addr: int) -> int:
        """How many VMAs start below ``addr``."""
        return len(self._neg) - bisect_right(self._neg, -addr)

    def overlaps(self, start: int, end: int) -> bool:
        """True when any VMA intersects ``[start, end)``."""
        i = self.first_ending_after(start)
        return i < len(self._store) and self._store[~i].start < end

    def is_free(self, start: int, end: int) -> bool:
        """True when ``[start, end)`` is inside the user space and intersects no VMA."""
        return end <= self.task_size and not self.overlaps(start, end)

    def clone(self, vma: Vma, start: int, end: int) -> Vma:
        """A copy of ``vma`` cut to ``[start, end)`` with its page offset moved along."""
        return Vma(start, end, vma.flags, vma.pgoff + ((start - vma.start) >> self.shift),
                   vma.file, vma.anon)

    def replace(self, i0: int, i1: int, new: list[Vma]) -> None:
        """Replace ``vmas[i0:i1]`` by ``new`` (sorted, within the same span), keeping the gap
        index and the files' use counts right. Every change of the VMAs goes here."""
        store, gaps = self._store, self.gaps
        j0, j1 = len(store) - i1, len(store) - i0  # the same VMAs in the store, highest first
        low = store[j1].end if i0 else 0
        high = store[j0 - 1].start if j0 else self.task_size
        old = store[j0:j1]
        edge = high
        for v in old:
            if v.end < edge:
                gaps.remove(v.end, edge)
            edge = v.start
        if low < edge:
            gaps.remove(low, edge)
        edge = high
        for v in reversed(new):
            if v.end < edge:
                gaps.add(v.end, edge)
            edge = v.start
            if v.file is not None:
                self.files.use(v.file)
        if low < edge:
            gaps.add(low, edge)
        for v in old:
            if v.file is not None:
                self.files.unuse(v.file)
        store[j0:j1] = new[::-1]
        self._neg[j0:j1] = [-v.start for v in store[j0: j0 + len(new)]]

    def cut(self, start: int, end: int, i0: int = -1) -> int:
        """Remove ``[start, end)`` (PTEs already zapped), keeping the parts of straddling
        VMAs outside it; ``i0``, when known, is the index of the first VMA ending after
        ``start``. Returns the index where ``start`` would go."""
        if i0 < 0:
            i0 = self.first_ending_after(start)
        if i0 < len(self._store):
            first = self._store[~i0]
            if start <= first.start and first.end == end:
                self._drop_alone(i0)
                return i0
        i1 = self.count_below(end)
        if i0 >= i1:
            return i0
        first, last = self._store[~i0], self._store[~(i1 - 1)]
        rest = []
        if first.start < start:
            rest.append(self.clone(first, first.start, start))
        if last.end > end:
            rest.append(self.clone(last, end, last.end))
        self.replace(i0, i1, rest)
        return i0 + (first.start < start)

    def insert(self, i: int, new: Vma) -> None:
        """Put a new VMA at index ``i``, merged with its neighbours as vma_merge_new_range
        would (a new VMA has no anon_vma and takes its neighbour's; mremap's copy has its
        source's, which the merged VMA keeps)."""
        store = self._store
        prev = store[~(i - 1)] if i else None
        nxt = store[~i] if i < len(store) else None
        left = prev is not None and mergeable(prev, new, self.shift)
        right = nxt is not None and mergeable(new, nxt, self.shift)
        if left and right and prev and nxt and prev.anon and nxt.anon and prev.anon != nxt.anon:
            right = False
        if left and prev:
            high, anon = (nxt.end, prev.anon or new.anon or nxt.anon) if right and nxt else (
                new.end, prev.anon or new.anon)
            self.replace(i - 1, i + right,
                         [Vma(prev.start, high, new.flags, prev.pgoff, new.file, anon)])
        elif right and nxt:
            self.replace(i, i + 1, [Vma(new.start, nxt.end, new.flags, new.pgoff, new.file,
                                        new.anon or nxt.anon)])
        else:
            self._put_alone(i, new)

    def _put_alone(self, i: int, new: Vma) -> None:
        """``replace(i, i, [new])`` for a VMA that merges with neither neighbour: the free gap
        it lands in is split in two. A path of its own because most mmaps end here, and the
        general loops, slices and list building of :meth:`replace` cost as much as the rest
        of an anonymous mmap."""
        store, gaps = self._store, self.gaps
        j = len(store) - i  # the store is highest first: new goes before store[j]
        low = store[j].end if i else 0
        high = store[j - 1].start if j else self.task_size
        gaps.move_end(low, high, new.start)
        gaps.add(new.end, high)
        if new.file is not None:
            self.files.use(new.file)
        store.insert(j, new)
        self._neg.insert(j, -new.start)

    def _drop_alone(self, i: int) -> None:
        """``replace(i, i + 1, [])``: remove ``vmas[i]`` whole, the free gaps either side of
        it joined. The munmap of a whole mapping, on a path of its own for the reason given
        in :meth:`_put_alone`."""
        store, gaps = self._store, self.gaps
        j = len(store) - 1 - i
        vma = store[j]
        low = store[j + 1].end if j + 1 < len(store) else 0
        high = store[j - 1].start if j else self.task_size
        gaps.remove(vma.end, high)
        gaps.move_end(low, vma.start, high)
        if vma.file is not None:
            self.files.unuse(vma.file)
        del store[j]
        del self._neg[j]

    def modify(self, i: int, start: int, end: int, newflags: int) -> int:
        """vma_modify: give ``[start, end)`` of ``vmas[i]`` the flags ``newflags``, merging
        with a neighbour when Linux would, else splitting (ENOMEM at max_map_count; a first
        split stays done). Returns the index of the VMA covering the range."""
        vma = self[i]
        pgoff = vma.pgoff + ((start - vma.start) >> self.shift)
        piece = Vma(start, end, newflags, pgoff, vma.file, vma.anon)
        prev = self[i - 1] if i and start == vma.start else None
        nxt = self[i + 1] if i + 1 < len(self._store) and end == vma.end else None
        left = prev is not None and mergeable(prev, piece, self.shift)
        right = nxt is not None and mergeable(piece, nxt, self.shift)
        if left and right and prev and nxt and prev.anon and nxt.anon and prev.anon != nxt.anon:
            right = False
        if left and prev:
            high = nxt.end if right and nxt else end
            merged = Vma(prev.start, high, newflags, prev.pgoff, vma.file,
                         prev.anon or (nxt.anon if right and nxt else 0) or vma.anon)
            rest = [] if end == vma.end else [self.clone(vma, end, vma.end)]
            self.replace(i - 1, i + (2 if right else 1), [merged, *rest])
            return i - 1
        if right and nxt:
            merged = Vma(start, nxt.end, newflags, pgoff, vma.file, nxt.anon or vma.anon)
            rest = [] if start == vma.start else [self.clone(vma, vma.start, start)]
            self.replace(i, i + 2, [*rest, merged])
            return i + len(rest)
        return self._split_modify(i, start, end, newflags)

    def _split_modify(self, i: int, start: int, end: int, newflags: int) -> int:
        """modify without a merge: split ``vmas[i]`` at ``start`` and ``end`` as needed,
        then give the middle ``newflags``. Returns its index."""
        vma = self[i]
        if start > vma.start:
            self._check_split(vma)
            self.replace(i, i + 1, [self.clone(vma, vma.start, start),
                                    self.clone(vma, start, vma.end)])
            i += 1
            vma = self[i]
        if end < vma.end:
            self._check_split(vma)
            self.replace(i, i + 1, [self.clone(vma, vma.start, end),
                                    self.clone(vma, end, vma.end)])
        self[i].flags = newflags
        return i

    def _check_split(self, vma: Vma) -> None:
        """split_vma's limit: ENOMEM when the map already holds max_map_count VMAs."""
        if len(self._store) >= self.max_map_count:
            self.unmerged_possible = True  # an earlier split of this call stays done
            raise MmapError(errno.ENOMEM, f"splitting {vma.start:#x}-{vma.end:#x} would pass "
                            f"max_map_count={self.max_map_count}")

    def topdown(self, length: int, low: int, high: int) -> int:
        """Start of the highest free range of ``length`` in ``[low, high)``, or -1."""
        end = self.gaps.highest(length, low, high)
        return end - length if end >= 0 else -1

    def bottomup(self, length: int, low: int, high: int) -> int:
        """Start of the lowest free range of ``length`` in ``[low, high)``, or -1 (a scan:
        only used when top-down placement fails or for MAP_32BIT)."""
        edge = low
        n = len(self._store)
        for i in range(self.first_ending_after(low), n + 1):
            nxt = self[i].start if i < n else self.task_size
            if min(nxt, high) - edge >= length:
                return edge
            if nxt >= high:
                return -1
            edge = max(edge, self[i].end)
        return -1

    def regions(self) -> list[Region]:
        """The VMAs as ``/proc/self/maps`` shows them (file paths as they are now)."""
        paths: dict[int, str] = {}
        out = []
        shift = self.shift
        for v in self:
            f = v.file
            prot, shared = _PROTS[v.flags & VM_ACCESS], bool(v.flags & VM_MAYSHARE)
            if f is None:
                out.append(Region(v.start, v.end, prot, shared))
            elif isinstance(f, Shmem):
                out.append(Region(v.start, v.end, prot, shared, v.pgoff << shift, f.dev, f.ino,
                                  f.path))
            else:
                path = paths.get(id(f))
                if path is None:
                    path = paths[id(f)] = f.path()
                out.append(Region(v.start, v.end, prot, shared, v.pgoff << shift, f.inode.dev,
                                  f.inode.ino, path))
        return out
