"""The properties as a pytest module, for long campaigns with HypoFuzz (``hypothesis fuzz``)
and for replaying their findings with plain pytest.

Part of the fuzz kit (``vmsim.fuzz``). Four ordinary hypothesis tests, one per kind of
example (:data:`vmsim.fuzz.suite.CASE_KINDS`) and loader:

* ``test_project_valid``, ``test_project_malformed``: the project's loader (``loader.load``),
  with every check the testbed has for it (its symbols and its plan too);
* ``test_named_valid``, ``test_named_malformed``: the loader that ``VMSIM_LOADER=MODULE:FUNCTION``
  names (a loader under test, see ``vmsim.fuzz.contract``; unset: the project's loader behind
  the same contract), on images kept within ``VMSIM_RELOCATIONS`` (e.g. ``RELATIVE`` or
  ``RELATIVE,GLOB_DAT``; unset: every type the images carry).

Run them::

    pip install 'vmsim[fuzz]'          # HypoFuzz and redis: see the licence below
    hypothesis fuzz -n 2 -- --pyargs vmsim.fuzz.targets
    VMSIM_LOADER=mymod:load VMSIM_RELOCATIONS=RELATIVE \\
        hypothesis fuzz -n 2 -- --pyargs vmsim.fuzz.targets -k named

and replay what any worker found with plain pytest, no HypoFuzz needed (the same
``VMSIM_LOADER``, and the database directory here or the same Redis)::

    VMSIM_FUZZ_REPLAY=1 python -m pytest --pyargs vmsim.fuzz.targets

More in docs/fuzzing-at-scale.md.

The example database (where hypothesis saves every failing example, and HypoFuzz its corpus)
is shared by every process that runs these tests:

* ``VMSIM_FUZZ_DB``: a directory, default ``vmsim-fuzz-db`` in the current directory. Not
  hypothesis' own ``.hypothesis/``, which is a cache people delete and ignore in git; this
  directory holds findings worth keeping: copy it, commit it, hand it to a colleague.
* ``VMSIM_FUZZ_REDIS=redis://host:port/db``: also hypothesis' Redis database
  (``hypothesis.extra.redis.RedisExampleDatabase``), for workers on several machines; every
  example is written to both and read from both.

Each loader under test has its own part of the database: ``$VMSIM_FUZZ_DB/project`` when
``VMSIM_LOADER`` is unset, ``$VMSIM_FUZZ_DB/loader-MODULE-FUNCTION`` otherwise (and the same
namespace in Redis): hypothesis forgets a saved failure that no longer fails, so a planted
bug's finding must not be replayed, and dropped, by another loader's run. Importing this
module makes its settings hypothesis' default profile (HypoFuzz fuzzes only tests whose
database is the default one): run it on its own, not beside other tests.
``VMSIM_FUZZ_REPLAY=1`` runs only the database's examples (hypothesis' explicit and reuse
phases): a finding fails at once.

Licence: HypoFuzz is not open-source software. Its licence grants use "for non-commercial
purposes only" (education, personal projects, non-commercial open source, non-profit
research); any use in a commercial organisation, including internal testing and CI, needs a
commercial licence from its author. That is why it is the optional extra ``vmsim[fuzz]``,
which you choose to install, and never a dependency of vmsim. This module needs only
hypothesis and pytest; ``vmsim fuzz`` is the quick campaign that needs nothing more.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    MultiplexedDatabase,
)

from vmsim.fuzz.contract import LoaderUnderTest, loader_named, project_loader
from vmsim.fuzz.suite import check_case, loader_cases

__all__ = [
    "DEFAULT_DATABASE",
    "example_database",
    "named_loader",
    "named_relocations",
    "test_named_malformed",
    "test_named_valid",
    "test_project_malformed",
    "test_project_valid",
    "use_fuzz_profile",
]

DEFAULT_DATABASE = "vmsim-fuzz-db"
"""The example database's directory when ``VMSIM_FUZZ_DB`` is unset (relative to the current
directory)."""


def example_database(namespace: str) -> ExampleDatabase:
    """The shared example database of ``namespace`` (one per loader): the directory
    ``$VMSIM_FUZZ_DB/namespace``, and with ``VMSIM_FUZZ_REDIS`` also that Redis server's
    keys ``vmsim:namespace:...`` (needs the ``redis`` package)."""
    directory = os.environ.get("VMSIM_FUZZ_DB") or DEFAULT_DATABASE
    local = DirectoryBasedExampleDatabase(os.path.join(directory, namespace))
    url = os.environ.get("VMSIM_FUZZ_REDIS")
    if not url:
        return local
    from hypothesis.extra.redis import RedisExampleDatabase

    client = importlib.import_module("redis").Redis.from_url(url)
    shared = RedisExampleDatabase(client, key_prefix=f"vmsim:{namespace}:".encode())
    return MultiplexedDatabase(local, shared)


def named_loader() -> tuple[str, LoaderUnderTest]:
    """The loader ``VMSIM_LOADER`` names and its database namespace; unset: the project's
    loader behind the contract, namespace ``project``. ValueError (at import: a collection
    error) names a bad one."""
    spec = os.environ.get("VMSIM_LOADER", "")
    if not spec:
        return "project", project_loader
    return "loader-" + re.sub(r"[^A-Za-z0-9_.-]", "-", spec), loader_named(spec)


def named_relocations() -> list[str] | None:
    """The relocation types ``VMSIM_RELOCATIONS`` names (comma-separated); unset: None."""
    text = os.environ.get("VMSIM_RELOCATIONS", "")
    names = [name.strip() for name in text.split(",") if name.strip()]
    return names or None


def use_fuzz_profile(namespace: str) -> None:
    """Make the profile ``vmsim-fuzz`` hypothesis' default: the shared database of
    ``namespace``, no deadline (an example may build a large image), one bug reported per
    test; with ``VMSIM_FUZZ_REPLAY=1`` only the database's examples are run.

    A profile rather than each test's own settings because HypoFuzz fuzzes only the tests
    whose database is the default one (so that its dashboard and workers share it)."""
    replay = os.environ.get("VMSIM_FUZZ_REPLAY", "") not in ("", "0")
    settings.register_profile(
        "vmsim-fuzz", database=example_database(namespace), deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[Phase.explicit, Phase.reuse] if replay else list(Phase))
    settings.load_profile("vmsim-fuzz")


NAMESPACE, NAMED_LOADER = named_loader()
NAMED_RELOCATIONS = named_relocations()
use_fuzz_profile(NAMESPACE)


@given(loader_cases(kinds=["valid"]))
def test_project_valid(case: tuple[str, Any]) -> None:
    """Property 1 with 3-5: the project's loader loads a valid image as predicted."""
    check_case(case, None)


@given(loader_cases(kinds=["malformed"]))
def test_project_malformed(case: tuple[str, Any]) -> None:
    """Property 2 with 3-4: the project's loader loads or refuses a malformed image, and
    leaves nothing mapped."""
    check_case(case, None)


@given(loader_cases(NAMED_RELOCATIONS, kinds=["valid"]))
def test_named_valid(case: tuple[str, Any]) -> None:
    """Property 1 with 3-5 for ``VMSIM_LOADER``: a valid image loads as predicted."""
    check_case(case, NAMED_LOADER)


@given(loader_cases(NAMED_RELOCATIONS, kinds=["malformed"]))
def test_named_malformed(case: tuple[str, Any]) -> None:
    """Property 2 with 3-4 for ``VMSIM_LOADER``: a malformed image is loaded or refused,
    and nothing is left mapped."""
    check_case(case, NAMED_LOADER)
