"""`distill cache info DIR [--json]`: size and sanity numbers of a teacher cache."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cache", help="inspect teacher caches")
    sub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="tokens, bytes/token, k, aligned fraction, projected teacher bpb")
    info.add_argument("dir", help="cache directory")
    info.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    info.set_defaults(func=_info)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def cache_info(cache_dir: str) -> dict:
    from distill.cache import CacheReader

    r = CacheReader(cache_dir)
    m, st = r.manifest, r.manifest.get("stats", {})
    return {
        "tokens": st.get("tokens"),
        "bytes_on_disk": st.get("bytes_on_disk"),
        "bytes_per_token": st.get("bytes_per_token"),
        "k": r.k,
        "aligned_fraction": st.get("aligned_fraction"),
        "projected_teacher_bpb": st.get("projected_teacher_bpb"),
        "teacher_bpb": st.get("teacher_bpb"),
        "teacher": m.get("teacher", {}).get("id"),
        "teacher_revision": m.get("teacher", {}).get("revision"),
        "backend": m.get("backend", {}).get("name"),
        "backend_version": m.get("backend", {}).get("version"),
        "projection": m.get("projection", {}).get("kind"),
        "shards": [s["name"] for s in m.get("shards", [])],
        "format_version": m.get("format_version"),
    }


def _info(args) -> int:
    info = cache_info(args.dir)
    if args.json:
        print(json.dumps(info))
    else:
        for key, v in info.items():
            print(f"{key}: {v}")
    return 0
