"""``lmms-emi estimators``: the registered pre-trained estimators, and which are already on this machine."""

from __future__ import annotations

import argparse
import json

from lmms_emi import estimator_registry as registry
from lmms_emi.cli._commands import subcommand_parser
from lmms_emi.errors import EXIT_OK, LmmsEmiError, one_line

NAME = "estimators"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subcommand_parser(
        sub,
        NAME,
        f". Files are looked up in ${registry.DIR_ENV}, beside the registry, then in the "
        f"cache (${registry.CACHE_ENV}, else $XDG_CACHE_HOME/lmms_emi/estimators, else "
        "~/.cache/lmms_emi/estimators); a missing one is downloaded there on first use.",
    )
    p.add_argument(
        "--fetch", nargs="*", metavar="NAME", help="download these (none named: all) into the cache now"
    )
    p.add_argument("--json", action="store_true", help="print the registry and each file's status as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _status(entry: registry.RegistryEntry) -> tuple[str, str | None]:
    """("ready" | "not downloaded" | the problem, local path or None)."""
    try:
        path = registry.find_local(entry)
    except LmmsEmiError as exc:
        return f"unusable: {one_line(exc)}", None
    return ("ready", str(path)) if path is not None else ("not downloaded", None)


def run(ns: argparse.Namespace) -> int:
    entries = registry.load_registry()
    if ns.fetch is not None:
        for name in ns.fetch or sorted(entries):
            print(f"{name}: {registry.resolve(name, progress=not ns.quiet)}")
    rows = []
    for entry in entries.values():
        status, path = _status(entry)
        rows.append({**entry.__dict__, "encoders": entry.encoder_spec(), "status": status, "path": path})
    if ns.json:
        print(json.dumps({"cache": str(registry.cache_dir()), "estimators": rows}, indent=2))
        return EXIT_OK
    print(f"cache: {registry.cache_dir()}")
    for entry, row in zip(entries.values(), rows, strict=True):
        enc = row["encoders"]
        names = " + ".join(
            str(enc[m].get("name"))
            for m in sorted(enc, key=lambda r: r != "vision")
            if isinstance(enc[m], dict)
        )
        profile = f" (encoder profile {entry.encoders!r})" if isinstance(entry.encoders, str) else ""
        print(f"{entry.name}: {row['status']}{' at ' + row['path'] if row['path'] else ''}")
        print(f"  encoders: {names}{profile}")
        print(f"  file: {entry.file}, {entry.size} bytes, sha256 {entry.sha256}")
        print(f"  url: {entry.download_url()}")
        print(f"  license: {entry.license}; source: {entry.source}")
        print(f"  trained on: {entry.trained_on}")
    return EXIT_OK
