"""The experiment driver: the paper's comparison and its open questions on simulated data.

    python -m experiments paper-table --config conf/experiment.yaml --quick
    python -m experiments all --config conf/experiment.yaml

It launches the pipeline's own commands (the simulator and feature jobs under spark-submit,
the production trainer under horovodrun) and is not part of the ``esmm`` package, so it is
not shipped inside the registered MLflow models. Modules, one concern each:

- :mod:`experiments.config`: the experiment config (``conf/experiment.yaml``): DataSpec, the
  per-experiment sections, ExperimentConfig, load_experiment_config, PAPER_VARIANTS;
- :mod:`experiments.runner`: Context, RunSpec / RunResult, prepare_dataset, train and
  train_all with the cache of datasets and trainings (RunSpec.key), the MLflow parent runs;
- :mod:`experiments.tables`: Table, mean_std and the formats, the comparison, IEB-decile,
  ranking and bias-sweep tables, kendall_tau, gap_with_error;
- :mod:`experiments.plots`: the matplotlib plots of those tables;
- :mod:`experiments.cli`: the sub-commands (``cmd_*``), parse_args, main, write_report;
  :mod:`experiments.__main__` runs main.
"""
