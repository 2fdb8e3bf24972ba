"""`distill data download`: the challenge's cached token shards + tokenizer from the Hugging Face hub.

Hub layout (openai/parameter-golf `data/cached_challenge_fineweb.py`; the community sp4096/sp8192 repo
uses the same downloader with MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf). Paths inside the dataset
repo, under the remote root `datasets/`:

  | variant | default repo                 | shards folder                        | tokenizer                          |
  |---------|------------------------------|--------------------------------------|------------------------------------|
  | sp1024  | willdepueoai/parameter-golf  | datasets/datasets/fineweb10B_sp1024/ | datasets/tokenizers/fineweb_1024_bpe.model |
  | sp4096  | kevclark/parameter-golf      | datasets/datasets/fineweb10B_sp4096/ | datasets/tokenizers/fineweb_4096_bpe.model |
  | sp8192  | kevclark/parameter-golf      | datasets/datasets/fineweb10B_sp8192/ | datasets/tokenizers/fineweb_8192_bpe.model |

  datasets/manifest.json: {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": ..., "stats":
  {"files_train": .., "files_val": .., ...}}, ...], "tokenizers": [{"name": .., "model_path":
  "tokenizers/...model", "vocab_path": ...}]}. When the manifest names the shard counts and tokenizer
  paths they win over this table; per-file sizes / sha256 found in it are verified.

Local layout written under --out (the challenge's canonical `data/` layout, so its train_gpt.py can read it):
  OUT/manifest.json, OUT/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin, OUT/tokenizers/...

`--repo-id` may also name a local directory laid out like the hub repo (an offline mirror); files are
then copied from it instead of downloaded. Every shard is validated with distill.shards.read_header and
token ids are checked against the tokenizer's vocab.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.fsutil import atomic_path, sha256_file
from distill.shards import read_header, read_shard, shard_name
from distill.tokenizer import load_tokenizer

REMOTE_ROOT = "datasets"


@dataclass(frozen=True)
class Variant:
    repo_id: str
    dataset: str
    tokenizer_stem: str
    vocab_size: int


VARIANTS = {
    "sp1024": Variant("willdepueoai/parameter-golf", "fineweb10B_sp1024", "fineweb_1024_bpe", 1024),
    "sp4096": Variant("kevclark/parameter-golf", "fineweb10B_sp4096", "fineweb_4096_bpe", 4096),
    "sp8192": Variant("kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe", 8192),
}


def _fetch(repo_id: str, remote_path: str, revision: str | None, dest: Path) -> None:
    """Bring one repo file to `dest` (atomically). The only function that touches the network."""
    local_repo = Path(repo_id)
    with atomic_path(dest) as tmp:
        if local_repo.is_dir():  # offline mirror laid out like the hub repo
            src = local_repo / remote_path
            if not src.is_file():
                raise DistillError(f"{src}: not found in the local repo mirror")
            shutil.copyfile(src, tmp)
            return
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DistillError("huggingface_hub is required for `distill data download`") from None
        try:
            # resumable download into the HF cache, then a copy (the cache entry may be a symlink)
            cached = hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset",
                                     revision=revision)
        except Exception as e:  # noqa: BLE001 — network, 404, gated repo: one line
            raise DistillError(f"{repo_id}/{remote_path}: download failed ({str(e).splitlines()[0][:200]})") from None
        shutil.copyfile(Path(cached).resolve(), tmp)


def _manifest_file_index(manifest: dict) -> dict[str, dict]:
    """Any per-file records in the manifest (name/path + size/bytes + sha256), keyed by file name."""
    index: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            name = node.get("path") or node.get("name") or node.get("filename")
            if isinstance(name, str) and any(k in node for k in ("sha256", "size", "bytes", "num_bytes")):
                index[Path(name).name] = node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    return index


def _hub_file_index(repo_id: str, remote_paths: list[str], revision: str | None) -> dict[str, dict]:
    """Sizes + LFS sha256 the hub itself reports for these files ({} for a local mirror or when offline:
    hf_hub_download then raises its own one-line error)."""
    if Path(repo_id).is_dir():
        return {}
    try:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(repo_id, remote_paths, revision=revision, repo_type="dataset")
    except Exception:  # noqa: BLE001 — metadata is a bonus check; the download reports real failures
        return {}
    index = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        rec = {"bytes": getattr(info, "size", None)}
        if lfs is not None and getattr(lfs, "sha256", None):
            rec["sha256"] = lfs.sha256
        index[Path(info.path).name] = rec
    return index


def _verify(path: Path, record: dict | None) -> None:
    if not record:
        return
    size = record.get("size", record.get("bytes", record.get("num_bytes")))
    if isinstance(size, int) and path.stat().st_size != size:
        raise DistillError(f"{path}: size {path.stat().st_size} != {size} in the manifest (corrupt download?)")
    sha = record.get("sha256")
    if isinstance(sha, str) and sha256_file(path) != sha:
        raise DistillError(f"{path}: sha256 does not match the manifest (corrupt download?)")


def plan_files(variant: str, manifest: dict, train_shards: int) -> tuple[list[str], list[str], int]:
    """-> (remote shard paths, remote tokenizer paths, vocab_size) for `variant` from the hub manifest."""
    v = VARIANTS[variant]
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == v.dataset), None)
    stats = (entry or {}).get("stats") or {}
    n_val = int(stats.get("files_val", 1))
    n_train_max = stats.get("files_train")
    if n_train_max is not None and train_shards > int(n_train_max):
        raise DistillError(f"--train-shards: {variant} has only {n_train_max} training shards, asked for {train_shards}")
    ds_prefix = f"{REMOTE_ROOT}/datasets/{v.dataset}"
    shards = [f"{ds_prefix}/{shard_name('val', i)}" for i in range(n_val)]
    shards += [f"{ds_prefix}/{shard_name('train', i)}" for i in range(train_shards)]
    tok_entry = None
    if entry and entry.get("tokenizer_name"):
        tok_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry["tokenizer_name"]), None)
    if tok_entry and tok_entry.get("model_path"):
        tok = [f"{REMOTE_ROOT}/{tok_entry['model_path']}"]
        if tok_entry.get("vocab_path"):
            tok.append(f"{REMOTE_ROOT}/{tok_entry['vocab_path']}")
    else:
        tok = [f"{REMOTE_ROOT}/tokenizers/{v.tokenizer_stem}.model", f"{REMOTE_ROOT}/tokenizers/{v.tokenizer_stem}.vocab"]
    vocab = int((tok_entry or {}).get("vocab_size", v.vocab_size))
    return shards, tok, vocab


def _local_path(out: Path, remote_path: str) -> Path:
    rel = Path(remote_path).relative_to(REMOTE_ROOT)  # datasets/<name>/x.bin | tokenizers/x.model | manifest.json
    return out / rel


def download(variant: str, train_shards: int, out: str | os.PathLike, repo_id: str | None = None,
             revision: str | None = None, progress: bool = True) -> dict:
    """Download (or resume) `variant`; return {"shards": [...], "tokenizer": path, "manifest": path}."""
    if variant not in VARIANTS:
        raise DistillError(f"--variant: unknown {variant!r} (expected one of {sorted(VARIANTS)})")
    if train_shards < 0:
        raise DistillError(f"--train-shards: must be >= 0, got {train_shards}")
    repo = repo_id or VARIANTS[variant].repo_id
    out = Path(out)
    created_out = not out.exists()
    try:
        return _download(variant, train_shards, out, repo, revision, progress)
    except BaseException:
        if created_out and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)  # a failed first attempt leaves no empty folders
        raise  # completed files of a partial download stay: the next run resumes from them


def _download(variant: str, train_shards: int, out: Path, repo: str, revision: str | None, progress: bool) -> dict:
    manifest_path = out / "manifest.json"
    _fetch(repo, f"{REMOTE_ROOT}/manifest.json", revision, manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{manifest_path}: not a JSON manifest ({e})") from None
    shard_paths, tok_paths, vocab = plan_files(variant, manifest, train_shards)
    records = _manifest_file_index(manifest)
    records.update(_hub_file_index(repo, tok_paths + shard_paths, revision))  # the hub's own sizes/sha win

    from tqdm import tqdm

    local_shards: list[Path] = []
    for remote in tqdm(tok_paths + shard_paths, desc="download", unit="file", disable=None if progress else True):
        dest = _local_path(out, remote)
        rec = records.get(dest.name)
        if dest.is_file():  # resume: keep a file that already validates
            try:
                _verify(dest, rec)
                if dest.suffix == ".bin":
                    read_header(dest)
            except DistillError:
                dest.unlink()
        if not dest.is_file():
            _fetch(repo, remote, revision, dest)
            try:
                _verify(dest, rec)
                if dest.suffix == ".bin":
                    read_header(dest)
            except DistillError:
                dest.unlink(missing_ok=True)  # never leave a file that failed verification
                raise
        if dest.suffix == ".bin":
            local_shards.append(dest)
    tok_model = _local_path(out, next(p for p in tok_paths if p.endswith(".model")))
    sp = load_tokenizer(tok_model)
    if int(sp.vocab_size()) != vocab:
        raise DistillError(f"{tok_model}: vocab {sp.vocab_size()} != {vocab} expected for {variant}")
    for p in local_shards:  # header + size, and every id inside the tokenizer's vocab
        read_shard(p, vocab_size=vocab)
    return {"variant": variant, "repo_id": repo, "revision": revision, "manifest": str(manifest_path),
            "tokenizer": str(tok_model), "vocab_size": vocab,
            "shards": [{"path": str(p), "tokens": read_header(p)} for p in local_shards]}
