"""`distill cache info DIR [--json]`: size and sanity numbers of a teacher cache.
`distill cache convert SRC --out DST [--format-version 2] [--min-prob P] [--levels L]`: rewrite a cache in another format
(e.g. shrink a format-1 cache to format 2) without rerunning the teacher."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cache", help="inspect teacher caches")
    sub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="tokens, bytes/token, k, aligned fraction, projected teacher bpb")
    info.add_argument("dir", help="cache directory")
    info.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    info.set_defaults(func=_info)
    conv = sub.add_parser("convert", help="rewrite a cache in another format (no teacher pass)")
    conv.add_argument("src", help="source cache directory")
    conv.add_argument("--out", required=True, help="destination cache directory (resumable; refused if complete)")
    conv.add_argument("--format-version", type=int, default=2, choices=[1, 2], help="format written (default 2)")
    conv.add_argument("--min-prob", type=float, default=None,
                      help="format 2: entries below this go to the residual bucket (default: the format's default)")
    conv.add_argument("--levels", type=int, default=None,
                      help="format 2: log-code levels in [2, 255] (default 127: <= 2.5 %% relative error per entry; "
                           "255 halves it for ~+1 bit per entry)")
    conv.add_argument("--json", action="store_true", help="print the new cache's info as one JSON line")
    conv.set_defaults(func=_convert)
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


def _convert(args) -> int:
    from distill.cache import DEFAULT_LEVELS, DEFAULT_MIN_PROB, convert_cache

    min_prob = DEFAULT_MIN_PROB if args.min_prob is None else args.min_prob
    levels = DEFAULT_LEVELS if args.levels is None else args.levels
    convert_cache(args.src, args.out, format_version=args.format_version, min_prob=min_prob, levels=levels)
    info = cache_info(args.out)
    print(f"{args.out}: format {info['format_version']}, {info['bytes_per_token']:.2f} bytes/token "
          f"({info['bytes_on_disk']} bytes)", file=sys.stderr)
    if args.json:
        print(json.dumps(info))
    return 0


def _info(args) -> int:
    info = cache_info(args.dir)
    if args.json:
        print(json.dumps(info))
    else:
        for key, v in info.items():
            print(f"{key}: {v}")
    return 0
