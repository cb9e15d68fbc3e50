"""The command line: ``python -m experiments <sub-command> [--config ...] [--quick] ...``.

Each sub-command (a ``cmd_*`` function) trains its runs with :mod:`experiments.runner`,
builds its tables with :mod:`experiments.tables` and its plots with :mod:`experiments.plots`,
writes them under ``<workdir>/results/<sub-command>/`` and logs them as artifacts of one
MLflow parent run whose children are the trainings; :func:`main` runs them and
:func:`write_report` gathers every table of the invocation in ``report.md``. A config error
or an unreachable tracking server is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract import commands
from contract.config import ConfigError, add_override_argument
from esmm.losses import TaskWeights
from experiments.config import DataSpec, ExperimentConfig, load_experiment_config
from experiments.plots import plot_bias_sweep, plot_comparison, plot_ieb_deciles, plot_map
from experiments.runner import (
    Context,
    RunResult,
    RunSpec,
    close_parent,
    kept_dataset_stats,
    open_parent,
    prepare_dataset,
    resolve_context,
    train_all,
)
from experiments.tables import (
    Table,
    bias_sweep_table,
    ceiling_gain_table,
    ceiling_table,
    comparison_table,
    dataset_table,
    ieb_decile_table,
    map_table,
    memorisation_table,
    ranking_table,
    reference_ablation_table,
    spread_table,
)

__all__ = ["COMMANDS", "Outcome", "main", "parse_args", "write_report"]

PROG = "experiments"
EXIT_USAGE = 2


@dataclass
class Outcome:
    """What a sub-command produced."""

    tables: list[Table]
    files: list[Path]
    runs: list[RunResult]


REFERENCE_LABEL = "esmm (torch-rechub)"
REFERENCE_PROJECT_LR = "esmm (torch-rechub, project's lr)"
REFERENCE_PROJECT_OPTIM = "esmm (torch-rechub, project's optimizers)"


def paper_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    overrides = tuple(cfg.paper_table.overrides)
    specs = [
        RunSpec(variant, variant, seed, cfg.data, overrides)
        for variant in cfg.paper_table.variants
        for seed in cfg.seeds
    ]
    if cfg.paper_table.torch_rechub:
        specs += [
            RunSpec(REFERENCE_LABEL, "esmm", seed, cfg.data, implementation="torch-rechub")
            for seed in cfg.seeds
        ]
    if cfg.paper_table.torch_rechub_project_optim:
        specs += [
            RunSpec(
                REFERENCE_PROJECT_OPTIM,
                "esmm",
                s,
                cfg.data,
                implementation="torch-rechub+project-optim",
            )
            for s in cfg.seeds
        ]
    if cfg.paper_table.torch_rechub_project_lr:
        specs += [
            RunSpec(
                REFERENCE_PROJECT_LR, "esmm", s, cfg.data, implementation="torch-rechub+project-lr"
            )
            for s in cfg.seeds
        ]
    return specs


def cmd_paper_table(ctx: Context, parent: str, out: Path) -> Outcome:
    results = train_all(ctx, paper_specs(ctx.cfg), parent)
    data = ctx.cfg.data
    table = comparison_table(
        "paper_table",
        "CVR and CTCVR AUC by method (paper's Table 2 protocol, plus the entire space)",
        "model",
        results,
        reference="base" if "base" in ctx.cfg.paper_table.variants else None,
        notes=[
            f"Data: simulator preset `{data.preset}`, selection_bias {data.selection_bias:g}, "
            f"train on {data.train_days} day(s), choose each run's epoch on the next "
            f"{data.valid_days}, test on the {data.eval_days} after. "
            f"AUCs in points, mean ± sample std over seeds {ctx.cfg.seeds}; "
            "gains are differences of means in points.",
            "CVR AUC (clicked) is the paper's protocol; CVR AUC (entire space) scores pCVR "
            "on every test impression against its counterfactual conversion label; pCVR IEB "
            "is mean pCVR / mean true pCVR over all test impressions (1 = unbiased).",
        ],
    )
    deciles = ieb_decile_table(results)
    files = table.write(out) + deciles.write(out)
    files.append(plot_comparison(results, out / "paper_table.png", "ESMM family on simulated data"))
    files.append(plot_ieb_deciles(results, out / "ieb_by_ctr_decile.png"))
    return Outcome([table, deciles], files, results)


def cmd_task_weights(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    specs = []
    for weights in cfg.task_weights.settings:
        label = f"({weights.ctr:g}, {weights.cvr:g}, {weights.ctcvr:g})"
        sets = (
            f"loss.task_weights.ctr={weights.ctr}",
            f"loss.task_weights.cvr={weights.cvr}",
            f"loss.task_weights.ctcvr={weights.ctcvr}",
        )
        # the paper's weights are the trainer's defaults: the same run as paper-table's esmm
        default = weights == TaskWeights()
        for seed in cfg.seeds_for(cfg.task_weights.seeds):
            specs.append(RunSpec(label, "esmm", seed, cfg.data, () if default else sets))
    results = train_all(ctx, specs, parent)
    table = comparison_table(
        "task_weights",
        "ESMM with other task weights (CTR, CVR, CTCVR); the CVR loss is on clicked only",
        "weights (ctr, cvr, ctcvr)",
        results,
        reference="(1, 0, 1)"
        if any(w == TaskWeights() for w in cfg.task_weights.settings)
        else None,
        notes=["(1, 0, 1) is the paper's ESMM; gains are against it."],
    )
    files = table.write(out)
    files.append(plot_comparison(results, out / "task_weights.png", "ESMM task weights"))
    return Outcome([table], files, results)


def cmd_stop_gradient(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    specs = []
    for setting in cfg.stop_gradient.settings:
        label = f"CTCVR grad into {setting}"
        sets = () if setting == "both" else (f"loss.ctcvr_grad_into={setting}",)
        for seed in cfg.seeds_for(cfg.stop_gradient.seeds):
            specs.append(RunSpec(label, "esmm", seed, cfg.data, sets))
    results = train_all(ctx, specs, parent)
    table = comparison_table(
        "stop_gradient",
        "Which tower the CTCVR loss trains (the other tower's output is detached in pCTCVR)",
        "setting",
        results,
        reference="CTCVR grad into both" if "both" in cfg.stop_gradient.settings else None,
        notes=["'both' is the paper's ESMM; gains are against it."],
    )
    files = table.write(out)
    files.append(plot_comparison(results, out / "stop_gradient.png", "ESMM stop-gradient"))
    return Outcome([table], files, results)


def cmd_ranking(ctx: Context, parent: str, out: Path) -> Outcome:
    results = train_all(ctx, paper_specs(ctx.cfg), parent)
    table = ranking_table(results)
    return Outcome([table], table.write(out), results)


def cmd_bias_sweep(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    by_bias: dict[float, list[RunResult]] = {}
    for bias in cfg.bias_sweep.values:
        data = cfg.data.model_copy(update={"selection_bias": bias})
        specs = [
            RunSpec(variant, variant, seed, data)
            for variant in cfg.bias_sweep.variants
            for seed in cfg.seeds_for(cfg.bias_sweep.seeds)
        ]
        by_bias[bias] = train_all(ctx, specs, parent)
    table = bias_sweep_table(by_bias, list(cfg.bias_sweep.variants))
    files = table.write(out)
    files.append(plot_bias_sweep(table, list(cfg.bias_sweep.variants), out / "bias_sweep.png"))
    return Outcome([table], files, [r for rs in by_bias.values() for r in rs])


def _section(ctx: Context, name: str):
    """The config section ``name`` of a sub-command that needs one (ConfigError if unset)."""
    section = getattr(ctx.cfg, name)
    if section is None:
        raise ConfigError(f"{name}: the experiment config has no '{name}' section")
    return section


def _level_note(ctx: Context, spec: DataSpec) -> str:
    """The data of a map cell in a few words, from its kept dataset statistics."""
    stats = kept_dataset_stats(ctx, spec)
    if stats is None:
        return spec.preset
    test = stats["test"]
    return (
        f"{spec.preset}: {100 * stats['cold']['test_impressions_share']:.0f}% cold, "
        f"CVR given click {100 * test['cvr_given_click']:.1f}%, {test['conversions']} test conv."
    )


def cmd_map(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    grid = _section(ctx, "map")
    cells: dict[tuple[str, float], list[RunResult]] = {}
    notes: dict[tuple[str, float], str] = {}
    for level in grid.levels:
        for bias in grid.biases:
            data = cfg.dataset(level).model_copy(update={"selection_bias": bias})
            specs = [
                RunSpec(variant, variant, seed, data)
                for variant in grid.variants
                for seed in cfg.seeds_for(grid.seeds)
            ]
            cells[(level, bias)] = train_all(ctx, specs, parent)
            notes[(level, bias)] = _level_note(ctx, data)
    table = map_table(cells, grid.variants, grid.reference, notes)
    files = table.write(out)
    files.append(plot_map(table, grid.variants, grid.reference, out / "map.png"))
    return Outcome([table], files, [r for rs in cells.values() for r in rs])


def cmd_memorisation(ctx: Context, parent: str, out: Path) -> Outcome:
    return _compare_settings(ctx, parent, out, "memorisation", memorisation_table)


def cmd_spread(ctx: Context, parent: str, out: Path) -> Outcome:
    return _compare_settings(ctx, parent, out, "spread", spread_table)


def _compare_settings(
    ctx: Context,
    parent: str,
    out: Path,
    name: str,
    make_table: Callable[[dict[str, list[RunResult]], list[str], str], Table],
) -> Outcome:
    """Every setting × variant × seed of the section ``name`` on its datasets, judged on the
    validation day (``day="valid"``), in ``make_table``'s table."""
    cfg = ctx.cfg
    section = _section(ctx, name)
    names = section.datasets or ["data"]
    by_dataset: dict[str, list[RunResult]] = {}
    for name in names:
        data = cfg.dataset(name) if section.datasets else cfg.data
        specs = [
            RunSpec(setting.label, variant, seed, data, tuple(setting.sets))
            for setting in section.settings
            for variant in section.variants
            for seed in cfg.seeds_for(section.seeds)
        ]
        by_dataset[name] = train_all(ctx, specs, parent, day="valid")
    table = make_table(by_dataset, section.variants, section.settings[0].label)
    return Outcome([table], table.write(out), [r for rs in by_dataset.values() for r in rs])


def preset_volume(preset: str) -> int:
    """The impressions a day of a simulator preset (``conf/simulator.yaml``)."""
    from contract.config import load_config
    from features.config import SimulatorConfig

    config = load_config(commands.PROJECT_ROOT / "conf" / "simulator.yaml", SimulatorConfig)
    try:
        return config.preset(preset).impressions_per_day
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None


def cmd_ceiling(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    section = _section(ctx, "ceiling")
    data = cfg.dataset(section.dataset) if section.dataset else cfg.data
    volume = data.impressions_per_day or preset_volume(data.preset)
    scaled = data.model_copy(update={"impressions_per_day": volume * section.factor})
    seeds = cfg.seeds_for(section.seeds)
    base = train_all(ctx, [RunSpec(v, v, s, data) for v in section.variants for s in seeds], parent)
    more = train_all(
        ctx, [RunSpec(v, v, s, scaled) for v in section.variants for s in seeds], parent
    )
    made = [ceiling_table(base, more, section.variants, section.factor)]
    if "base" in section.variants and len(section.variants) > 1:
        made.append(ceiling_gain_table(base, more, section.variants, section.factor))
    files = [path for table in made for path in table.write(out)]
    return Outcome(made, files, [*base, *more])


def cmd_reference_ablation(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    section = _section(ctx, "reference_ablation")
    data = cfg.dataset(section.dataset) if section.dataset else cfg.data
    seeds = cfg.seeds_for(section.seeds)
    specs = [
        RunSpec(REFERENCE_LABEL, "esmm", s, data, implementation="torch-rechub") for s in seeds
    ]
    specs += [
        RunSpec(
            f"{REFERENCE_LABEL} + {change}",
            "esmm",
            s,
            data,
            implementation=f"torch-rechub+{change}",
        )
        for change in section.changes
        for s in seeds
    ]
    specs += [RunSpec("esmm", "esmm", s, data) for s in seeds]
    results = train_all(ctx, specs, parent)
    table = reference_ablation_table(results, REFERENCE_LABEL, "esmm")
    return Outcome([table], table.write(out), results)


def cmd_datasets(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    specs = {name: cfg.dataset(name) for name in cfg.datasets}
    if all(spec.key() != cfg.data.key() for spec in specs.values()):
        specs = {"data": cfg.data, **specs}  # the experiments' default dataset, if unnamed
    stats = {}
    for name, spec in specs.items():
        if not ctx.offline:
            prepare_dataset(ctx, spec)
        stats[name] = (spec, kept_dataset_stats(ctx, spec))
    table = dataset_table(stats)
    return Outcome([table], table.write(out), [])


COMMANDS: dict[str, Callable[[Context, str, Path], Outcome]] = {
    "paper-table": cmd_paper_table,
    "task-weights": cmd_task_weights,
    "stop-gradient": cmd_stop_gradient,
    "ranking": cmd_ranking,
    "bias-sweep": cmd_bias_sweep,
    "memorisation": cmd_memorisation,
    "spread": cmd_spread,
    "map": cmd_map,
    "ceiling": cmd_ceiling,
    "reference-ablation": cmd_reference_ablation,
    "datasets": cmd_datasets,
}
# what `all` runs: the paper's comparison and its open questions (map and memorisation are
# long grids of their own, datasets a look at the data)
ALL = ("paper-table", "task-weights", "stop-gradient", "ranking", "bias-sweep")

DESCRIPTIONS = {
    "paper-table": "every variant x every seed on one time-split dataset: the paper's Table 2 "
    "(CVR AUC on clicked impressions, CTCVR AUC, mean ± std, gain over BASE) plus what the "
    "paper could not measure: CVR AUC on the entire impression space against counterfactual "
    "labels, the oracle's AUCs (the ceiling) and pCVR's Inherent Estimation Bias (mean pCVR / "
    "mean true pCVR, ESCM²), overall and by pCTR decile",
    "task-weights": "ESMM with other (CTR, CVR, CTCVR) loss weights (open question 1)",
    "stop-gradient": "ESMM with the CTCVR gradient into both towers, the CVR tower or the CTR "
    "tower (open question 2)",
    "ranking": "how the methods rank by the paper's clicked-only CVR AUC vs the entire-space "
    "CVR AUC (open question 3), from the paper-table runs",
    "bias-sweep": "BASE and ESMM on datasets simulated with increasing selection bias: how "
    "the ESMM - BASE gap moves with the bias (plot)",
    "memorisation": "remedies of id memorisation (embedding L2, a lower sparse learning rate, "
    "id admission, tower dropout) against the current defaults, per variant, judged on the "
    "validation day only: which to keep as the trainer's defaults",
    "spread": "settings that might make a training steadier from seed to seed (weight "
    "averaging, smaller initial embeddings, id admission) against the current defaults, per "
    "variant: the spread over seeds of the validation day's entire-space CVR AUC, judged on "
    "the validation day only: which to keep as the trainer's defaults",
    "map": "when ESMM helps: every variant's CVR AUC gain over BASE (clicked and entire "
    "space, ± standard error over seeds) on a grid of sparsity levels x selection-bias "
    "values, as a table and a heatmap; --set 'map.levels=[sparse]' runs one level at a time",
    "ceiling": "the learnable ceiling: the same trainings on factor x the impressions a day "
    "(same preset, population, days), and the share of the gap to the oracle that the extra "
    "data closes: what is data-limited and what is model-limited",
    "reference-ablation": "torch-rechub's ESMM with one of its model defaults at a time "
    "(BatchNorm in the towers, embedding init, bag pooling, weight decay on the embeddings) "
    "replaced by the project's, beside its defaults and the project's ESMM: where the two "
    "implementations differ",
    "datasets": "build the configured datasets (data and every named one) and tabulate "
    "their sizes, positives, the precision their test split allows and their cold share",
    "all": "paper-table, task-weights, stop-gradient, ranking and bias-sweep under one MLflow "
    "parent run, plus report.md",
}

ABOUT = (
    "The paper's comparison and its open questions, on simulated data with ground truth. "
    "Every training is the production trainer (horovodrun -np N python -m esmm.train) on the "
    "feature job's Parquet output; the data are made by spark-submit jobs/generate_logs.py "
    "and jobs/build_features.py. Each sub-command writes its tables as markdown + CSV (and a "
    "plot where one helps) under <workdir>/results/ and logs them as artifacts of one MLflow "
    "parent run whose children are the trainings."
)
CACHE = (
    "Datasets and finished trainings are cached under the work dir by a key of everything "
    "that determines them, so an interrupted run resumes where it stopped and sub-commands "
    "share the trainings they have in common (--fresh ignores the cache)."
)
EXAMPLES = """examples:
  python -m experiments paper-table --config conf/experiment.yaml --quick
  python -m experiments all --config conf/experiment.yaml
  python -m experiments bias-sweep --set seeds=[1,2] --set np=1"""


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(text, width=88) for text in texts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a sub-command, then the options every sub-command takes."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", default="conf/experiment.yaml", help="experiment YAML")
    options.add_argument(
        "--quick",
        action="store_true",
        help="apply the config's 'quick' overrides (fewer seeds, smaller data): minutes",
    )
    options.add_argument(
        "--fresh", action="store_true", help="ignore cached datasets and trainings"
    )
    options.add_argument(
        "--offline",
        action="store_true",
        help="train nothing and touch no MLflow: rebuild the tables and plots from the kept "
        "training summaries (results_dir) alone; a missing one is an error that names it",
    )
    add_override_argument(
        options, "override an experiment-config key, e.g. --set seeds=[1,2] (repeatable)"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_paragraphs(ABOUT, CACHE),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUB-COMMAND")
    for name, text in DESCRIPTIONS.items():
        sub.add_parser(
            name,
            parents=[options],
            help=text,
            description=_paragraphs(f"{name}: {text}.", CACHE),
            epilog=f"example:\n  python -m {PROG} {name} --config conf/experiment.yaml --quick",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return parser.parse_args(argv)


def check_trainer_inputs(cfg: ExperimentConfig) -> None:
    """The train config, the experiment's trainer overrides and the field list they name are
    usable (:class:`ConfigError` otherwise), before any dataset or training starts."""
    RunSpec("check", "esmm", 0, cfg.data).determinants(cfg)


def error_line(exc: Exception) -> str:
    """``experiments: error: ...`` on one line (a config error lists its keys on several)."""
    first, *rest = str(exc).strip().splitlines() or [""]
    return f"{PROG}: error: " + " ".join([first, "; ".join(line.strip() for line in rest)]).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from esmm.tracking import TrackingError, flatten

    try:
        cfg = load_experiment_config(args.config, args.quick, args.overrides)
        check_trainer_inputs(cfg)
        if args.offline and args.fresh:
            raise ConfigError("--offline reads the kept summaries; --fresh would ignore them")
        ctx = resolve_context(cfg, args.fresh, args.offline)
    except (ConfigError, TrackingError) as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_USAGE
    names = list(ALL) if args.command == "all" else [args.command]
    params = flatten(cfg.model_dump(mode="json"))
    params["command"] = args.command
    params["quick"] = str(args.quick)
    started = time.monotonic()
    top = open_parent(ctx, args.command, None, params) if args.command == "all" else None
    outcomes: dict[str, Outcome] = {}
    for name in names:
        run_id = open_parent(ctx, name, top, {} if top else params)
        out = ctx.workdir / "results" / name.replace("-", "_")
        t0 = time.monotonic()
        try:
            outcome = COMMANDS[name](ctx, run_id, out)
        except (commands.StepFailed, ConfigError) as exc:
            close_parent(ctx, run_id, time.monotonic() - t0, None)
            if top:
                close_parent(ctx, top, time.monotonic() - started, None)
            if isinstance(exc, ConfigError):
                print(error_line(exc), file=sys.stderr)
                return EXIT_USAGE
            print(f"{PROG}: {name}: {exc}", file=sys.stderr)
            return 1
        close_parent(ctx, run_id, time.monotonic() - t0, outcome.files, len(outcome.runs))
        outcomes[name] = outcome
        for table in outcome.tables:
            print("\n" + table.markdown())
        where = "offline, from the kept summaries" if ctx.offline else f"MLflow run {run_id}"
        print(f"{name}: results in {out} ({where})", file=sys.stderr)
    elapsed = time.monotonic() - started
    command_line = "python -m experiments " + " ".join(argv if argv else sys.argv[1:])
    report = write_report(ctx, outcomes, command_line, elapsed)
    if top:
        close_parent(ctx, top, elapsed, [report])
    mlflow_line = (
        "" if ctx.offline else (f"\nMLflow: {ctx.tracking_uri} (experiment '{cfg.experiment}')")
    )
    print(
        f"\n{args.command}: {ctx.launched} trainings run, {ctx.reused} reused from the cache, "
        f"{elapsed / 60:.1f} min. Report: {report}{mlflow_line}",
        file=sys.stderr,
    )
    return 0


def write_report(ctx: Context, outcomes: dict[str, Outcome], command: str, seconds: float) -> Path:
    """All tables of this invocation in one markdown file, with the command and runtime."""
    lines = [
        "# Experiment report",
        "",
        f"Command: `{command}`  ",
        f"Wall clock: {seconds / 60:.1f} min ({ctx.launched} trainings run, "
        f"{ctx.reused} reused from the cache), {ctx.cfg.np} Horovod workers.",
        "",
    ]
    for name, outcome in outcomes.items():
        lines.append(f"## {name}\n")
        lines += [table.markdown() for table in outcome.tables]
        lines += [
            f"![{p.stem}]({p.relative_to(ctx.workdir / 'results')})"
            for p in outcome.files
            if p.suffix == ".png"
        ]
        lines.append("")
    path = ctx.workdir / "results" / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
