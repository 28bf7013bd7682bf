"""vmsim.viz: what each picture contains (patches, colours, hatches, texts, legend), not pixels.

Inputs come from the real kernel where possible: the map of libz as this process has it after
ctypes.CDLL, and a reservation whose protections the kernel split into several lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex, to_rgb
from matplotlib.patches import Rectangle

from loader.mmap import ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE as PAGE
from vmsim import viz

R, RW, RX, RWX, NONE = (ProtFlags.from_rwx(p) for p in ("r--", "rw-", "r-x", "rwx", "---"))


@pytest.fixture(autouse=True)
def _close_figures() -> object:
    yield
    plt.close("all")


def own_maps() -> list[Region]:
    with open("/proc/self/maps") as f:
        return [Region.parse(line) for line in f]


@pytest.fixture(scope="module")
def libz() -> list[Region]:
    """libz's lines in this process's /proc/self/maps, as the kernel and ld.so made them:
    the one contiguous run holding glibc's crc32 (earlier tests may have left other copies of
    libz in this process, mapped by our own loader)."""
    crc32 = ctypes.cast(ctypes.CDLL("libz.so.1").crc32, ctypes.c_void_p).value
    found = [r for r in own_maps() if re.search(r"/libz\.so\.1[.\d]*$", r.path)]
    at = next(i for i, r in enumerate(found) if r.start <= (crc32 or 0) < r.end)
    lo = hi = at
    while lo > 0 and found[lo - 1].end == found[lo].start:
        lo -= 1
    while hi + 1 < len(found) and found[hi].end == found[hi + 1].start:
        hi += 1
    run = found[lo: hi + 1]
    assert len(run) >= 3, run
    return run


def patches(ax: Axes, kind: str) -> dict[str, Rectangle]:
    """The rectangles whose gid is ``kind:<start hex>``, by start hex."""
    out = {}
    for p in ax.patches:
        gid = p.get_gid() or ""
        if gid.startswith(kind + ":") and isinstance(p, Rectangle):
            out[gid.split(":", 1)[1]] = p
    return out


def texts(ax: Axes, kind: str) -> dict[str, str]:
    return {t.get_gid().split(":", 1)[1]: t.get_text() for t in ax.texts
            if (t.get_gid() or "").startswith(kind + ":")}


def legend_labels(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, "every picture has a legend"
    return [t.get_text() for t in legend.get_texts()]


def hue(color: object) -> str:
    """A coarse name for a colour, independent of the exact palette."""
    r, g, b = to_rgb(color)  # type: ignore[arg-type]
    if min(r, g, b) > 0.9:
        return "plain"
    if r > 0.8 and g < 0.5 and b < 0.5:
        return "red"
    if r > 0.5 and b > 0.7 and g < 0.6:
        return "purple"
    if g > 0.7 and b > 0.7 and r < 0.5:
        return "cyan"
    if r > 0.9 and 0.5 < g < 0.8 and b < 0.3:
        return "orange"
    return "other"


# --- the map of a real library ----------------------------------------------------------------

def test_libz_map_has_one_patch_per_region_coloured_by_role(libz: list[Region]) -> None:
    ax = viz.plot_map(libz)
    drawn = patches(ax, "region")
    assert sorted(drawn) == sorted(f"{r.start:#x}" for r in libz)
    expected = {"r-x": "red", "rw-": "purple", "r--": "plain"}
    for r in libz:
        assert hue(drawn[f"{r.start:#x}"].get_facecolor()) == expected[r.prot.rwx], r


def test_libz_labels_name_object_perms_offset_and_size(libz: list[Region]) -> None:
    ax = viz.plot_map(libz)
    labels = texts(ax, "label")
    for r in libz:
        text = labels[f"{r.start:#x}"]
        assert r.path.rsplit("/", 1)[1] in text and "/" not in text
        assert r.perms in text and f"{r.offset:#x}" in text
        assert viz.format_size(r.length) in text


def test_libz_legend_names_each_role_present(libz: list[Region]) -> None:
    ax = viz.plot_map(libz)
    assert {"code (x)", "data (w)", "rodata (r only)"} <= set(legend_labels(ax))
    assert "guard / reserved (---)" not in legend_labels(ax)


def test_regions_are_to_scale_among_themselves(libz: list[Region]) -> None:
    ax = viz.plot_map(libz)
    drawn = patches(ax, "region")
    heights = {r.length: drawn[f"{r.start:#x}"].get_height() for r in libz}
    # Two regions big enough to escape the minimum height: heights in the ratio of lengths.
    big = sorted(n for n in heights if n >= 4 * PAGE)[:2]
    if len(big) == 2:
        assert heights[big[1]] / heights[big[0]] == pytest.approx(big[1] / big[0], rel=1e-6)
    # And adjacent regions touch: no space between them.
    for a, b in itertools.pairwise(libz):
        if a.end == b.start:
            pa, pb = drawn[f"{a.start:#x}"], drawn[f"{b.start:#x}"]
            assert pa.get_y() + pa.get_height() == pytest.approx(pb.get_y())


def test_relro_is_hatched_over_exactly_its_range(libz: list[Region]) -> None:
    # Pretend RELRO is the second-to-last region (in libz it is the r--p line before rw-p).
    target = libz[-2]
    ax = viz.plot_map(libz, relro=(target.start, target.end))
    hatched = patches(ax, "relro")
    assert list(hatched) == [f"{target.start:#x}"]
    over, region = hatched[f"{target.start:#x}"], patches(ax, "region")[f"{target.start:#x}"]
    assert over.get_hatch() and "/" in over.get_hatch() and over.get_facecolor()[3] == 0
    assert (over.get_y(), over.get_height()) == pytest.approx((region.get_y(), region.get_height()))
    assert "RELRO" in texts(ax, "label")[f"{target.start:#x}"]
    assert any("RELRO" in t for t in legend_labels(ax))


def test_relro_part_of_a_region_hatches_only_that_part() -> None:
    data = Region(0x10000, 0x10000 + 4 * PAGE, RW)
    ax = viz.plot_map([data], relro=(data.start, data.start + PAGE))
    tag = f"{data.start:#x}"
    over, whole = patches(ax, "relro")[tag], patches(ax, "region")[tag]
    assert over.get_height() == pytest.approx(whole.get_height() / 4)


# --- what the kernel splits, drawn --------------------------------------------------------------

def test_kernel_split_reservation_draws_guard_data_guard_code_guard() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = 16 * PAGE
    base = libc.mmap(None, length, 0, 0x22, -1, 0)   # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
    assert base not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.mprotect(base + 4 * PAGE, 2 * PAGE, int(RW)) == 0
        assert libc.mprotect(base + 8 * PAGE, PAGE, int(RX)) == 0
        inside = [r for r in own_maps() if base <= r.start and r.end <= base + length]
    finally:
        libc.munmap(base, length)
    assert [r.perms for r in inside] == ["---p", "rw-p", "---p", "r-xp", "---p"]
    ax = viz.plot_map(inside)
    drawn = patches(ax, "region")
    assert [hue(drawn[f"{r.start:#x}"].get_facecolor()) for r in inside] == [
        "cyan", "purple", "cyan", "red", "cyan"]
    assert "guard / reserved (---)" in legend_labels(ax)
    assert all(t.startswith("[anon]") for t in texts(ax, "label").values())


# --- gaps, flags, roles -------------------------------------------------------------------------

def test_gap_is_compressed_and_states_its_size() -> None:
    low = Region(0x400000, 0x400000 + PAGE, RX, path="/bin/demo")
    gib = 1 << 30
    near = Region(low.end + 2 * gib - 100 * 1024 * 1024 - PAGE, 0, R)
    near = Region(near.start, near.start + PAGE, R)
    far = Region(low.end + 64 * gib, low.end + 64 * gib + PAGE, R)
    ax_near, ax_far = viz.plot_map([low, near]), viz.plot_map([low, far])
    assert list(texts(ax_near, "gap").values()) == [f"gap {viz.format_size(near.start - low.end)}"]
    assert list(texts(ax_near, "gap").values()) == ["gap 1.9 GiB"]
    assert list(texts(ax_far, "gap").values()) == ["gap 64 GiB"]
    # Not to scale: a 1.9 GiB and a 64 GiB gap take the same height.
    assert ax_near.get_ylim() == pytest.approx(ax_far.get_ylim())
    assert "unmapped (gaps not to scale)" in legend_labels(ax_near)


def test_wx_region_is_flagged_in_red() -> None:
    wx = Region(0x10000, 0x10000 + PAGE, RWX, path="/tmp/jit")
    ax = viz.plot_map([wx, Region(wx.end, wx.end + PAGE, R, path="/tmp/jit")])
    flag = patches(ax, "wx")
    assert list(flag) == [f"{wx.start:#x}"]
    assert flag[f"{wx.start:#x}"].get_hatch() and "x" in flag[f"{wx.start:#x}"].get_hatch()
    assert hue(flag[f"{wx.start:#x}"].get_edgecolor()) == "other"  # dark red edge
    assert to_hex(flag[f"{wx.start:#x}"].get_edgecolor()) == viz.WX_COLOR
    assert "W+X" in texts(ax, "label")[f"{wx.start:#x}"]
    assert any(t.startswith("W+X") for t in legend_labels(ax))


def test_extern_stub_mapping_has_its_own_colour() -> None:
    stub = Region(0x20000, 0x20000 + PAGE, RX, path="[extern]")
    ax = viz.plot_map([stub])
    assert hue(patches(ax, "region")[f"{stub.start:#x}"].get_facecolor()) == "orange"
    assert "extern stubs" in legend_labels(ax)
    other = Region(0x20000, 0x20000 + PAGE, RX, path="[stubs]")
    ax2 = viz.plot_map([other], extern_paths=["[stubs]"])
    assert hue(patches(ax2, "region")[f"{other.start:#x}"].get_facecolor()) == "orange"


def test_custom_labels_replace_the_default_text(libz: list[Region]) -> None:
    ax = viz.plot_map(libz, labels={libz[0].start: "ELF header and .dynsym"})
    assert texts(ax, "label")[f"{libz[0].start:#x}"] == "ELF header and .dynsym"


def test_empty_map_still_has_a_legend_of_every_role() -> None:
    ax = viz.plot_map([])
    assert set(viz.ROLE_LEGEND.values()) <= set(legend_labels(ax))


def test_plot_map_draws_on_the_axes_it_is_given(libz: list[Region]) -> None:
    _, (a, b) = plt.subplots(1, 2)
    assert viz.plot_map(libz, ax=b) is b
    assert not a.patches and len(patches(b, "region")) == len(libz)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (12, "12 B"), (PAGE, "4 KiB"),
                                         (3 << 29, "1.5 GiB"), (1 << 40, "1 TiB")])
def test_format_size(n: int, text: str) -> None:
    if n == PAGE and PAGE != 4096:
        text = viz.format_size(PAGE)
    assert viz.format_size(n) == text


# --- page states --------------------------------------------------------------------------------

def test_pages_one_cell_per_page_coloured_by_state() -> None:
    states = ["not present", "zero page", "shared file page", "private copy", "dirty",
              viz.PageState.DIRTY, "ZERO"]
    ax = viz.plot_pages(states, start=0x7000, columns=4)
    cells = [c for c in ax.collections if c.get_gid() == "pages"]
    assert len(cells) == 1 and isinstance(cells[0], PolyCollection)
    faces = [to_hex(c) for c in cells[0].get_facecolors()]
    expected = [viz.PAGE_COLORS[viz.PageState.parse(s)] for s in states]
    assert faces == expected
    assert len(set(faces)) == 5
    labels = legend_labels(ax)
    assert "dirty (2)" in labels and "zero page (2)" in labels and "not present (1)" in labels
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == ["0x7000", f"{0x7000 + 4 * PAGE:#x}"]


def test_pages_unknown_state_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"'swapped'.*'zero page'"):
        viz.plot_pages(["swapped"])


# --- before/after and traces --------------------------------------------------------------------

def _reserve_then_map() -> tuple[list[Region], list[Region]]:
    base, n = 0x7F0000000000, 8 * PAGE
    before = [Region(base, base + n, NONE)]
    after = [Region(base, base + 2 * PAGE, R, offset=0, path="/lib/libdemo.so"),
             Region(base + 2 * PAGE, base + 3 * PAGE, RX, offset=2 * PAGE, path="/lib/libdemo.so"),
             Region(base + 3 * PAGE, base + n, NONE)]
    return before, after


def test_before_after_outlines_what_changed_on_one_scale() -> None:
    before, after = _reserve_then_map()
    left, right = viz.plot_before_after(before, after)
    assert set(patches(left, "changed")) == {f"{before[0].start:#x}"}
    assert set(patches(right, "changed")) == {f"{after[0].start:#x}", f"{after[1].start:#x}",
                                             f"{after[2].start:#x}"}
    # The same address sits at the same height on both sides.
    assert patches(left, "region")[f"{before[0].start:#x}"].get_y() == pytest.approx(
        patches(right, "region")[f"{after[0].start:#x}"].get_y())
    assert left.get_ylim() == right.get_ylim()
    assert any("changed" in t for t in legend_labels(right))


def test_before_after_unchanged_regions_are_not_outlined() -> None:
    _, after = _reserve_then_map()
    left, right = viz.plot_before_after(after, after)
    assert not patches(left, "changed") and not patches(right, "changed")


def _trace() -> list[dict[str, object]]:
    before, after = _reserve_then_map()
    base = before[0].start
    return [
        {"op": "mmap_reserve", "addr": None, "length": 8 * PAGE, "use_file": True,
         "result": base, "maps": [str(r) for r in before]},
        {"op": "mmap", "args": {"addr": base, "length": 3 * PAGE, "prot": 1, "flags": 0x12,
                                "offset": 0, "fd": 3},
         "result": base,
         "maps": [str(Region(base, base + 3 * PAGE, R, path="/lib/libdemo.so")), str(after[2])]},
        {"op": "mprotect", "addr": base + 2 * PAGE, "length": PAGE, "prot": 5,
         "result": None, "maps": after},
    ]


def test_trace_frames_accept_json_style_and_nested_args() -> None:
    frames = viz.trace_frames(_trace())
    assert [f.op for f in frames] == ["mmap_reserve", "mmap", "mprotect"]
    assert frames[0].args == {"addr": None, "length": 8 * PAGE, "use_file": True}
    assert [len(f.maps) for f in frames] == [1, 2, 3]
    assert "prot=r--" in viz.format_call(frames[1])
    assert "MAP_PRIVATE|MAP_FIXED" in viz.format_call(frames[1])


def test_trace_record_without_maps_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"mmap.*maps"):
        viz.trace_frames([{"op": "mmap", "result": 0}])


def test_plot_trace_titles_each_step_and_outlines_its_change() -> None:
    calls = _trace()
    ax = viz.plot_trace(calls, step=2)
    assert ax.get_title(loc="left").startswith("step 3/3\nmprotect(")
    base = _reserve_then_map()[1][0].start
    assert set(patches(ax, "changed")) == {f"{base:#x}", f"{base + 2 * PAGE:#x}"}
    first = viz.plot_trace(calls, step=0)
    assert first.get_ylim() == ax.get_ylim(), "all frames share one scale"


def test_animate_trace_has_one_frame_per_call() -> None:
    anim = viz.animate_trace(_trace(), interval=100)
    html = anim.to_jshtml()
    assert len(re.findall(r"frames\[\d+\] = ", html)) == 3


# --- recording a trace on the real kernel -------------------------------------------------------

def test_maps_recorder_frames_are_the_kernels_maps_after_each_call() -> None:
    from loader.libc import LibcMmap, read_maps
    from loader.mmap import MapFlags, MmapError

    rec = viz.MapsRecorder(LibcMmap())
    fixed = MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS | MapFlags.MAP_FIXED
    base = rec.mmap_reserve(None, 8 * PAGE, True)
    try:
        rec.mmap(base + 2 * PAGE, 2 * PAGE, RW, fixed, 0, None)
        rec.mprotect(base + 3 * PAGE, PAGE, R)
        with pytest.raises(MmapError):
            rec.mprotect(base + 1, PAGE, R)          # unaligned: EINVAL, recorded too
        inside = [r for r in read_maps() if base <= r.start and r.end <= base + 8 * PAGE]
    finally:
        rec.munmap(base, 8 * PAGE)
    frames = viz.trace_frames(rec.frames)
    assert [f.op for f in frames] == ["mmap_reserve", "mmap", "mprotect", "mprotect", "munmap"]
    assert frames[3].error == "EINVAL"
    assert frames[2].maps == inside                  # only the arena, as the kernel shows it
    assert [r.perms for r in frames[2].maps] == ["---p", "rw-p", "r--p", "---p"]
    assert frames[-1].maps == []
    ax = viz.plot_trace(rec.frames, step=2)
    assert set(patches(ax, "changed")) == {f"{base + 2 * PAGE:#x}", f"{base + 3 * PAGE:#x}"}
    assert [ln.get_gid() for ln in ax.lines].count("touched") == 1
    assert "range this call acted on" in legend_labels(ax)
    assert "error EINVAL" in viz.plot_trace(rec.frames, step=3).get_title(loc="left")


def test_loading_libz_on_the_host_gives_one_frame_per_call(libz: list[Region]) -> None:
    import loader
    from loader.libc import LibcMmap

    rec = viz.MapsRecorder(LibcMmap())
    obj = loader.load(libz[0].path, rec)
    try:
        frames = viz.trace_frames(rec.frames)
        assert len(frames) == len(obj.mm.calls)
        last = frames[-1].maps
        assert [r.perms for r in last] == [r.perms for r in libz]   # as glibc's ld.so did
        ax = viz.plot_trace(rec.frames, relro=obj.relro)
        assert obj.relro is not None and f"{obj.relro[0]:#x}" in patches(ax, "relro")
    finally:
        obj.unload()


# --- page states: the simulator's page table beside the kernel's pagemap ------------------------

def _touch(read: object, write: object, base: int) -> None:
    read(base + PAGE, 1)                      # type: ignore[operator]
    write(base + 2 * PAGE, b"x")              # type: ignore[operator]


def _pfn(addr: int) -> int:
    import struct

    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(addr // PAGE * 8)
        (word,) = struct.unpack("<Q", pm.read(8))
    return int(word & ((1 << 55) - 1))


def test_page_states_of_the_simulator_match_the_kernels_pagemap(libz: list[Region]) -> None:
    import os

    import vmsim
    from loader.libc import LibcMmap
    from loader.mmap import MapFlags

    flags = MapFlags.MAP_PRIVATE
    fd = os.open(libz[0].path, os.O_RDONLY)
    host, sim = LibcMmap(), vmsim.AddressSpace()
    try:
        got: dict[str, list[str]] = {}
        for name, mm in (("host", host), ("sim", sim)):
            f = mm.mmap(None, 4 * PAGE, RW, flags, 0, fd).addr
            a = mm.mmap(None, 4 * PAGE, RW, flags | MapFlags.MAP_ANONYMOUS, 0, None).addr
            for base in (f, a):
                _touch(mm.read, mm.write, base)
            mm.read(a + 3 * PAGE, 1)          # a second zero-page reader
            if name == "host":
                states = viz.host_page_states(f, f + 4 * PAGE) + \
                    viz.host_page_states(a, a + 4 * PAGE)
                if os.geteuid() == 0:         # frame numbers visible: check the zero page
                    assert _pfn(a + PAGE) == _pfn(a + 3 * PAGE) != _pfn(a + 2 * PAGE)
            else:
                states = viz.page_states(sim, f, f + 4 * PAGE) + \
                    viz.page_states(sim, a, a + 4 * PAGE)
            got[name] = [s.value for s in states]
            mm.munmap(f, 4 * PAGE)
            mm.munmap(a, 4 * PAGE)
    finally:
        os.close(fd)
    # Touched pages agree; untouched file pages may be present on the host (fault-around).
    touched = [1, 2, 5, 6, 7]
    assert [got["sim"][i] for i in touched] == [got["host"][i] for i in touched] == [
        "shared file page", "private copy", "zero page", "dirty", "zero page"]
    assert got["sim"][4] == got["host"][4] == "not present"
    assert got["sim"][0] == "not present"


def test_page_states_refuses_unaligned_ranges() -> None:
    import vmsim

    with pytest.raises(ValueError, match="page-aligned"):
        viz.page_states(vmsim.AddressSpace(), 1, PAGE)
    with pytest.raises(ValueError, match="page-aligned"):
        viz.host_page_states(PAGE, 1)


def test_side_without_a_region_shows_it_unmapped_with_its_size() -> None:
    before, after = _reserve_then_map()
    extra = Region(after[-1].end + 16 * PAGE, after[-1].end + 17 * PAGE, R)
    left, right = viz.plot_before_after(before, [*after, extra])
    assert list(texts(left, "unmapped").values()) == [f"unmapped {viz.format_size(17 * PAGE)}"]
    assert list(texts(right, "gap").values()) == [f"gap {viz.format_size(16 * PAGE)}"]
    assert not texts(right, "unmapped")


def test_annotate_address_marks_the_height_of_that_address(libz: list[Region]) -> None:
    ax = viz.plot_map(libz)
    code = next(r for r in libz if r.prot == RX)
    viz.annotate_address(ax, code.start, "entry")
    line = next(ln for ln in ax.lines if ln.get_gid() == f"annotation:{code.start:#x}")
    assert line.get_ydata()[0] == pytest.approx(patches(ax, "region")[f"{code.start:#x}"].get_y())
    assert texts(ax, "annotation")[f"{code.start:#x}"] == "entry"
    _, bare = plt.subplots()
    with pytest.raises(ValueError, match="draw a map"):
        viz.annotate_address(bare, 0, "x")


def test_pages_cell_text_is_written_in_each_cell() -> None:
    ax = viz.plot_pages(["dirty", "zero page"], cell_text=["rw-", "r--"])
    assert [t.get_text() for t in ax.texts if (t.get_gid() or "").startswith("cell:")] == [
        "rw-", "r--"]
    with pytest.raises(ValueError, match="1 texts for 2 pages"):
        viz.plot_pages(["dirty", "dirty"], cell_text=["rw-"])


def test_anonymous_regions_show_no_file_offset() -> None:
    anon = Region(0x10000, 0x10000 + PAGE, RW)
    ax = viz.plot_map([anon])
    assert texts(ax, "label")[f"{anon.start:#x}"].split()[:3] == ["[anon]", "rw-p", "-"]


def test_a_region_far_bigger_than_the_rest_is_drawn_shortened_and_says_so() -> None:
    small = [Region(0x10000 + i * PAGE, 0x10000 + (i + 1) * PAGE, R, path="/lib/x.so")
             for i in range(4)]
    huge = Region(small[-1].end, small[-1].end + 4096 * PAGE, RX, path="/lib/x.so")
    ax = viz.plot_map([*small, huge])
    drawn = patches(ax, "region")
    assert drawn[f"{huge.start:#x}"].get_height() < 100 * drawn[f"{small[0].start:#x}"].get_height()
    assert [ln.get_gid() for ln in ax.lines].count(f"shortened:{huge.start:#x}") == 1
    assert "≈ big region drawn shortened" in legend_labels(ax)
    assert viz.format_size(huge.length) in texts(ax, "label")[f"{huge.start:#x}"]


def test_this_whole_process_draws_one_patch_per_line() -> None:
    regions = own_maps()      # hundreds of lines, up to the vsyscall page at the top of memory
    ax = viz.plot_map(regions)
    assert len(patches(ax, "region")) == len(regions)
    ys = [patches(ax, "region")[f"{r.start:#x}"].get_y() for r in regions]
    assert ys == sorted(ys) and len(set(ys)) == len(ys)


def test_plot_loaded_draws_the_span_and_the_extern_stubs(libz: list[Region]) -> None:
    import loader
    import vmsim

    space = vmsim.AddressSpace()
    obj = loader.load(libz[0].path, space)
    ax = viz.plot_loaded(obj)
    drawn = patches(ax, "region")
    assert len(drawn) == len(space.maps())           # libz's lines plus the extern page
    ext = obj.relocations.extern_range
    assert ext is not None and hue(drawn[f"{ext[0]:#x}"].get_facecolor()) == "orange"
    assert f"{obj.relro[0]:#x}" in patches(ax, "relro")
    assert [r.perms for r in space.maps() if r.start < obj.span[1]] == [r.perms for r in libz]
