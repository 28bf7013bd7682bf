"""Process images for the ``vmsim`` command: ``load --deps``, ``maps --deps`` and ``why``.

Part of the command layer (imports ``loader`` and ``vmsim``; ``vmsim.cli`` imports it). An
``Image`` is a ``loader.LinkMap`` on the simulator holding PATH and its closure: a program
(PT_INTERP, or ET_EXEC) is ``exec``'d as ld.so starts it, anything else is ``dlopen``'ed
from the smallest real process (a program linked against libc only, so libc.so.6 and ld.so
come first). This module builds the image and turns it into data and sentences; the
command prints them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from loader.elfdefs import DT, EHDR_DTYPE, ET
from loader.errors import ElfHeaderError
from loader.linkmap import Binding, LinkMap, Why
from loader.mmap import Region
from loader.outcome import regions_in
from loader.pipeline import LoadedObject
from loader.search import read_object

__all__ = ["Image", "image_report", "image_text", "is_program", "object_fields",
           "open_image", "why_lines"]

Bind = Literal["now", "lazy"]
GOT_WORD = 8
"""Bytes per GOT entry on x86-64 (GOT[2], the lazy resolver's address, is the third)."""


def is_program(path: str) -> bool:
    """Whether ld.so would start ``path`` as a program (it has PT_INTERP, or is ET_EXEC)
    rather than open it as a library. ElfError when it is not x86-64 ELF64."""
    info = read_object(path)
    if info is None:
        raise ElfHeaderError(f"{path}: e_ident[EI_CLASS]/e_machine", path,
                             "an ELF64 x86-64 file")
    if info.interp:
        return True
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(EHDR_DTYPE.itemsize), dtype=EHDR_DTYPE)
    return int(header["e_type"][0]) == ET.EXEC


@dataclass
class Image:
    """PATH and its closure in one ``LinkMap`` on the simulator: ``how`` it was loaded
    ("exec" or "dlopen"), with which ``bind``, and its ``root`` (the program or the
    dlopen'ed object)."""

    path: str
    how: Literal["exec", "dlopen"]
    bind: Bind
    preload: tuple[str, ...]
    lm: LinkMap
    root: LoadedObject

    @property
    def objects(self) -> list[LoadedObject]:
        """The image's objects in link-map order (on the simulator every one was loaded by
        our loader: no object is a host resident)."""
        return [o for o in self.lm.objects if isinstance(o, LoadedObject)]

    def role(self, obj: LoadedObject) -> str:
        """Why ``obj`` is in the image, in a few words."""
        if obj is self.root:
            return "the program" if self.how == "exec" else "dlopen'ed"
        if obj.name in self.preload or _same_file(obj.path, self.preload):
            return "preload"
        objects = self.objects
        if self.how == "dlopen" and objects.index(obj) < objects.index(self.root):
            return "already in the process: the smallest program needs it"
        return "dependency"

    def find(self, name: str) -> LoadedObject:
        """The object called ``name`` (soname, file name or path); KeyError listing the
        names when there is none."""
        for obj in self.objects:
            if name in (obj.name, obj.path, os.path.basename(obj.path)) or \
                    _same_file(obj.path, (name,)):
                return obj
        raise KeyError(f"no object called {name!r} in the image of {self.path} (it has "
                       f"{', '.join(o.name for o in self.objects)})")


def _same_file(path: str, others: Sequence[str]) -> bool:
    """Whether ``path`` names the same file as one of ``others`` (realpath)."""
    real = os.path.realpath(path)
    return any(os.path.realpath(o) == real for o in others if "/" in o)


def open_image(path: str, *, library_path: Sequence[str] = (), preload: Sequence[str] = (),
               bind: Bind | None = None) -> Image:
    """Load ``path`` and its closure on a fresh simulator: ``exec`` for a program (bind
    lazy by default, as ld.so), ``dlopen`` otherwise (bind now by default, RTLD_NOW)."""
    from vmsim import AddressSpace

    lm = LinkMap(AddressSpace(), library_path=library_path, preload=preload)
    if is_program(path):
        chosen: Bind = bind or "lazy"
        root = lm.exec(path, bind=chosen)
        return Image(path, "exec", chosen, tuple(preload), lm, root)
    chosen = bind or "now"
    opened = lm.dlopen(path, bind=chosen)
    assert isinstance(opened, LoadedObject)     # the simulator holds no host residents
    return Image(path, "dlopen", chosen, tuple(preload), lm, opened)


def object_fields(obj: LoadedObject, maps: list[Region]) -> dict[str, Any]:
    """The fields of docs/DESIGN.md's ``vmsim load --json`` that describe one object:
    path, load_bias, span, regions (those of ``maps`` inside the span), relro, relocations."""
    start, end = obj.span
    rel = obj.relocations
    return {
        "path": obj.path,
        "load_bias": obj.load_bias,
        "span": [start, end],
        "regions": [{"start": r.start, "end": r.end, "perms": r.perms, "offset": r.offset,
                     "path": r.path} for r in regions_in(maps, start, end)],
        "relro": None if obj.relro is None else list(obj.relro),
        "relocations": {"applied": rel.applied, "by_type": dict(sorted(rel.by_type.items())),
                        "unresolved": list(rel.unresolved)},
    }


def image_report(image: Image) -> dict[str, Any]:
    """``vmsim load --deps --json``: the image as one JSON object. Each entry of "objects"
    has the single-object fields (``object_fields``) plus "name" and "role"; "init_order"
    lists names; "tls" one entry per module (static_offset: below the thread pointer, or
    "dynamic"); "bindings" counts the symbol relocations and the pending ones."""
    lm = image.lm
    maps = lm.mm.inner.maps()
    objects = [{"name": o.name, "role": image.role(o), **object_fields(o, maps)}
               for o in image.objects]
    bound = lm.bindings()
    return {"path": image.path, "backend": "sim", "how": image.how, "bind": image.bind,
            "preload": list(image.preload), "objects": objects,
            "init_order": list(lm.init_order), "tls": lm.tls,
            "bindings": {"symbolic": len(bound), "pending": sum(b.pending for b in bound)},
            "calls": [c.as_dict() for c in lm.mm.calls]}


def image_text(report: dict[str, Any]) -> list[str]:
    """``vmsim load --deps``: the objects in link-map order with base, span and relocation
    counts, then init order, TLS and bindings, in lines for a reader."""
    from vmsim.viz import format_size

    how = ("exec'd as ld.so starts a program" if report["how"] == "exec" else
           "dlopen'ed by the smallest program (linked against libc only)")
    lines = [f"{report['path']} on {report['backend']}: {how}, bind {report['bind']}; "
             f"{len(report['objects'])} objects in link-map order:"]
    for i, o in enumerate(report["objects"], 1):
        lo, hi = o["span"]
        rel = o["relocations"]
        kinds = ", ".join(f"{k.removeprefix('R_X86_64_')} {v}"
                          for k, v in sorted(rel["by_type"].items(), key=lambda kv: -kv[1]))
        lines += [f"{i:3}. {o['name']} ({o['role']})", f"     {o['path']}",
                  f"     load bias {o['load_bias']:#x}, span {lo:#x}-{hi:#x} "
                  f"({format_size(hi - lo)})",
                  f"     relocations: {rel['applied']} applied" + (f": {kinds}" if kinds
                                                                     else "")]
    lines.append("init order (dependencies first; recorded, no code runs on the "
                 "simulator): " + ", ".join(report["init_order"]))
    lines += _tls_lines(report["tls"])
    bound = report["bindings"]
    lines.append(f"bindings: {bound['symbolic']} symbol relocations, {bound['pending']} "
                 "pending (lazy slots not called yet, IFUNC resolvers not run); "
                 "'vmsim why SYMBOL PATH' tells how one symbol was found")
    lines.append(f"{len(report['calls'])} Mmap calls (--json lists them)")
    return lines


def _tls_lines(tls: list[dict[str, Any]]) -> list[str]:
    """One line per TLS module."""
    if not tls:
        return ["TLS: none (no object has a PT_TLS segment)"]
    out = ["TLS (module id, block size and alignment, where the block is):"]
    for t in tls:
        offset = t["static_offset"]
        where = ("dynamic (allocated per thread on first use)" if offset == "dynamic" else
                 f"static, at the thread pointer - {offset:#x}")
        out.append(f"  module {t['module_id']}: {t['name']}, {t['size']} bytes aligned "
                   f"{t['align']}, {where}")
    return out


def image_regions(image: Image) -> tuple[list[Region], list[tuple[int, int]],
                                         dict[int, str]]:
    """Every region of the image's address space, every object's RELRO range, and the
    names of the regions only the image knows: the lazy-binding resolver page (what
    GOT[2] of a lazily bound object points at)."""
    mm = image.lm.mm.inner
    labels: dict[int, str] = {}
    for obj in image.objects:
        got = obj.tables.tags.get(DT.PLTGOT)
        if got and image.bind == "lazy":
            word = int.from_bytes(mm.read(obj.load_bias + got + 2 * GOT_WORD, GOT_WORD),
                                  "little")
            labels[word] = "[lazy resolver (GOT[2]); int3 until code runs]"
    return mm.maps(), [o.relro for o in image.objects if o.relro], labels


# --- why ---------------------------------------------------------------------------------


def scope_order(image: Image, obj: LoadedObject) -> list[str]:
    """The objects of ``obj``'s scope in lookup order, each once (``LinkMap.scope_of``)."""
    return image.lm.scope_of(obj)


def why_lines(image: Image, symbol: str, from_name: str | None = None
              ) -> tuple[list[str], bool]:
    """``vmsim why``: how ``symbol`` is looked up from ``from_name``'s scope (default: the
    program or the dlopen'ed object), in sentences; and whether somebody defines it."""
    asker = image.find(from_name) if from_name else image.root
    name, _, version = symbol.partition("@")
    refs = [b for b in image.lm.bindings() if b.object == asker.name and b.symbol == name
            and (not version or b.version == version)]
    wanted = symbol
    if "@" not in symbol and refs and refs[0].version:
        wanted = f"{symbol}@{refs[0].version}"
    why = image.lm.why(wanted, asker)
    lines = _asking(asker, wanted, refs) + _scope_lines(image, asker)
    lines += [f"  {i}. {step.obj} {_said(step.said)}." for i, step in enumerate(why.steps, 1)]
    lines += _verdict(image, why, asker, refs)
    return lines, why.winner is not None


def _said(said: str) -> str:
    """What one object said (``loader.scope``'s words), as the end of a sentence."""
    if said.startswith("defines it"):
        return "defines it: this is the definition that wins"
    have, sep, want = said.partition("; wanted ")
    if said.startswith("has versions ") and sep:
        return (f"defines it, but in version {have.removeprefix('has versions ')}, not the "
                f"one wanted: {want}")
    return said


def _asking(asker: LoadedObject, wanted: str, refs: list[Binding]) -> list[str]:
    """Who looks the symbol up, and how it refers to it."""
    if not refs:
        return [f"{asker.name} does not refer to {wanted} itself; here is how a reference to "
                f"it from {asker.name} would be looked up."]
    kinds = sorted({b.type.removeprefix("R_X86_64_") for b in refs})
    return [f"{asker.name} refers to {wanted} ({len(refs)} relocation"
            f"{'s' if len(refs) > 1 else ''}: {', '.join(kinds)}). The dynamic linker looks "
            "it up object by object in its scope; the first object that defines it wins."]


def _scope_lines(image: Image, asker: LoadedObject) -> list[str]:
    """What the scope is, in order."""
    objects = image.objects
    local = image.how == "dlopen" and objects.index(asker) >= objects.index(image.root)
    what = ("the global scope (the process's startup objects), then the dlopen'ed "
            "object's own closure (its local scope)" if local else
            "the global scope (the program, its preloads, then their dependencies "
            "breadth-first)" if image.how == "exec" else
            "the global scope (the process's startup objects: preloads, libc and its "
            "closure)")
    return [f"The scope of {asker.name} is {what}: {', '.join(scope_order(image, asker))}.",
            "Asked in that order:"]


def _verdict(image: Image, why: Why, asker: LoadedObject, refs: list[Binding]
             ) -> list[str]:
    """The winner, what it interposes, and what the reference holds now."""
    name = why.symbol + (f"@{why.version}" if why.version else "")
    if why.winner is None:
        return [f"Nobody in the scope defines {name}: a reference to it is an 'undefined "
                "symbol' error when it is bound (a weak reference gets 0 instead)."]
    out = [f"Winner: {why.winner} (its definition of {name} is the one used)."]
    for other in why.interposed:
        out.append(f"{why.winner} interposes {other}: {other} defines {why.symbol} too, but "
                   f"comes later in the scope, so its definition is not used from here.")
    if not why.interposed:
        out.append("Nothing is interposed: no later object of the scope defines it.")
    out += [_holds(image, b) for b in refs]
    return out


def _holds(image: Image, b: Binding) -> str:
    """What one relocation word of the reference holds now."""
    where = f"{b.type.removeprefix('R_X86_64_')} at {b.object}+{b.r_offset:#x}"
    if b.target is None:
        return f"The {where} holds {b.value:#x} (bound to nobody)."
    asker, target = image.find(b.object), image.find(b.target)
    if b.pending and asker.span[0] <= b.value < asker.span[1]:
        return (f"The {where} holds {b.value:#x} = {b.object} + "
                f"{b.value - asker.load_bias:#x}, its own PLT code: bound lazily, the "
                f"first call goes through the resolver in GOT[2], which looks the symbol "
                f"up as above and writes {b.target}'s address into the slot.")
    if b.pending:
        return (f"The {where} holds {b.value:#x} = {b.target} + "
                f"{b.value - target.load_bias:#x}, the address of an IFUNC resolver: glibc "
                "runs it and stores what it returns; the simulator runs no code, so it is "
                "pending.")
    return (f"The {where} holds {b.value:#x} = {b.target} + "
            f"{b.value - target.load_bias:#x}.")
