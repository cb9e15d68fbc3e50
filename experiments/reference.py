"""An independent ESMM: torch-rechub's, trained on the very same feature tables.

``python -m experiments.reference --features ROOT --train-dates A..B --valid-date V
--eval-date T [--oracle ROOT] --summary-json PATH [--set key=value ...]``

The model is ``torch_rechub.models.multi_task.ESMM`` (one embedding layer shared by a CVR
and a CTR tower, pCTCVR = pCTR × pCVR) and each epoch is torch-rechub's own
``MTLTrainer.train_one_epoch`` (for ESMM its loss is BCE(pCTR, click) + BCE(pCTCVR,
click ∧ conversion), with torch-rechub's default Adam, lr 1e-3 and weight decay 1e-5 on every
parameter). What this project decides is only what must be the same for a comparison:

- the data: the feature tables' fields, each a torch-rechub ``SparseFeature`` (a multi field,
  0-padded, a mean-pooled ``SequenceFeature``) over the ids the splits hold
  (:func:`compact_ids`), with the train config's embedding size, tower sizes, batch size,
  seed and ``epochs``;
- the protocol: after every epoch the validation day is scored and the epoch kept by the
  trainer's own rule (:class:`esmm.selection.EpochRule`, the train config's ``selection:``);
  the test day is scored once with the kept weights, by :func:`esmm.metrics.evaluate_predictions`.

The outcome is the trainer's summary JSON (``run_id``, ``metrics``), so the experiments treat
the run as any other. ``--optimizer project`` swaps in the project's learning rates (a
diagnostic of where the two implementations differ). It is also one MLflow run (params,
per-epoch validation metrics, test metrics) under ``--parent-run-id`` when given. One
process, CPU: torch-rechub has no Horovod.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.config import ConfigError, add_override_argument, load_config
from contract.dates import DateError, parse_partitions
from contract.fields import FieldsConfig
from contract.layout import as_url, partition_dir
from contract.schema import CLICK, CONVERSION, IMPRESSION_ID

__all__ = ["CHANGES", "build_reference_model", "compact_ids", "main", "read_split"]

PROG = "experiments.reference"

# One of torch-rechub's defaults replaced by the project's (``--change``): the ablation that
# asks which difference between the two models costs torch-rechub its points on sparse data.
CHANGES = {
    "no-batchnorm": "towers without BatchNorm (ours have none; torch-rechub's MLP has one a layer)",
    "init-0.01": "embeddings initialised N(0, 0.01) (ours), not torch-rechub's N(0, 1e-4)",
    "sum-pooling": "bags sum-pooled (ours, the paper's), not torch-rechub's mean",
    "no-embedding-decay": "no weight decay on the embeddings (ours), the towers keep 1e-5",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train torch-rechub's ESMM on the project's feature tables under the "
        "project's protocol (best validation epoch kept, test day scored once).",
    )
    parser.add_argument("--config", default="conf/train.yaml", help="train config (sizes, rule)")
    parser.add_argument("--features", required=True, help="feature table root (path or URL)")
    parser.add_argument("--train-dates", required=True, help="A..B, A,B or A")
    parser.add_argument("--valid-date", required=True, help="the day that chooses the epoch")
    parser.add_argument("--eval-date", required=True, help="the test day(s)")
    parser.add_argument("--oracle", default=None, help="simulator oracle root (entire space)")
    parser.add_argument("--summary-json", required=True, help="where the outcome goes")
    parser.add_argument(
        "--optimizer",
        choices=("torch-rechub", "project", "project-sparse"),
        default="torch-rechub",
        help="torch-rechub: its MTLTrainer's default Adam (lr 1e-3, weight decay 1e-5, every "
        "parameter); project: Adam with the train config's optim.lr for the towers and "
        "optim.sparse_lr for the embeddings, times --lr-scale; project-sparse: the same rates "
        "with the project's optimizers, SparseAdam on the embeddings (only the rows a batch "
        "looks up move) and Adam on the towers (diagnostics)",
    )
    parser.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="with --optimizer project: the factor the project's trainer applies for its "
        "workers (scale_lr_by_workers), e.g. 2 to match horovodrun -np 2",
    )
    parser.add_argument(
        "--change",
        action="append",
        default=[],
        choices=sorted(CHANGES),
        help="replace one of torch-rechub's defaults by the project's (repeatable): "
        + "; ".join(f"{k}: {v}" for k, v in CHANGES.items()),
    )
    parser.add_argument("--run-name", default="esmm (torch-rechub)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run")
    add_override_argument(parser, "override a train-config key, e.g. --set epochs=4")
    return parser.parse_args(argv)


def read_split(features: str, partitions: Sequence[str], fields: FieldsConfig) -> dict:
    """The partitions' fields and labels as numpy arrays (a multi field ``[N, max_len]``)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    names = [f.name for f in fields.fields]
    root = as_url(features)
    table = pa.concat_tables(
        ds.dataset(partition_dir(root, p), format="parquet").to_table(
            columns=[IMPRESSION_ID, CLICK, CONVERSION, *names]
        )
        for p in partitions
    )
    out = {
        IMPRESSION_ID: table.column(IMPRESSION_ID).to_numpy(zero_copy_only=False),
        CLICK: table.column(CLICK).to_numpy().astype(np.float32),
        CONVERSION: table.column(CONVERSION).to_numpy().astype(np.float32),
    }
    for spec in fields.fields:
        column = table.column(spec.name).combine_chunks()
        if spec.kind == "single":
            out[spec.name] = column.to_numpy().astype(np.int64)
        else:
            out[spec.name] = column.flatten().to_numpy().astype(np.int64).reshape(-1, spec.max_len)
    return out


def compact_ids(splits: Sequence[dict], fields: FieldsConfig) -> dict[str, int]:
    """Renumber every field's ids, in place, to ``1..n`` over the ids the splits hold (0, the
    padding, stays 0); return each field's table size ``n + 1``.

    The same model as one row per hash bucket: a bucket no split holds is never looked up.
    It keeps torch-rechub's dense Adam from updating ~1.5M untouched rows a step (the
    feature tables hash into up to 1M buckets a field).

    Example:
        >>> from contract.fields import FieldSpec
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="u", kind="single", source="users.u", num_buckets=1000),
        ...     FieldSpec(name="b", kind="multi", source="users.b", num_buckets=1000, max_len=2)])
        >>> a = {"u": np.array([7, 900]), "b": np.array([[5, 0], [900, 5]])}
        >>> b = {"u": np.array([7, 3]), "b": np.array([[0, 0], [1, 0]])}
        >>> compact_ids([a, b], fields), a["u"].tolist(), b["u"].tolist(), a["b"].tolist()
        ({'u': 4, 'b': 4}, [2, 3], [2, 1], [[2, 0], [3, 2]])
    """
    sizes = {}
    for spec in fields.fields:
        seen = np.unique(np.concatenate([split[spec.name].ravel() for split in splits]))
        seen = seen[seen != 0]
        for split in splits:
            values = split[spec.name]
            # ids in seen get 1..n by rank; 0 stays 0
            ranks = np.searchsorted(seen, values) + 1
            split[spec.name] = np.where(values == 0, 0, ranks).astype(np.int64)
        sizes[spec.name] = int(seen.size) + 1
    return sizes


def build_reference_model(
    fields: FieldsConfig,
    embedding_dim: int,
    hidden_dims: list[int],
    sizes: dict[str, int],
    changes: Sequence[str] = (),
):
    """torch-rechub's ESMM over ``fields``: ``user_*`` fields as its user features, the rest
    (item and context) as its item features; both towers ``hidden_dims``; ``sizes`` are the
    tables' row counts (:func:`compact_ids`); ``changes`` (keys of :data:`CHANGES`) replace
    its model defaults by the project's.

    Example:
        >>> from contract.fields import FieldSpec
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="user_id", kind="single", source="users.u", num_buckets=9),
        ...     FieldSpec(name="bag", kind="multi", source="items.b", num_buckets=9, max_len=2)])
        >>> import torch
        >>> model = build_reference_model(fields, 4, [8], {"user_id": 9, "bag": 9})
        >>> any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
        True
        >>> model = build_reference_model(fields, 4, [8], {"user_id": 9, "bag": 9},
        ...                               ["no-batchnorm", "sum-pooling"])
        >>> any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
        False
        >>> [f.pooling for f in model.item_features]
        ['sum']
    """
    import torch
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.basic.initializers import RandomNormal
    from torch_rechub.models.multi_task import ESMM

    unknown = sorted(set(changes) - set(CHANGES))
    if unknown:
        raise ValueError(f"unknown changes {unknown}; known: {sorted(CHANGES)}")
    extra = {}
    if "init-0.01" in changes:
        from esmm.model import EMBEDDING_INIT_STD

        extra["initializer"] = RandomNormal(0.0, EMBEDDING_INIT_STD)
    pooling = "sum" if "sum-pooling" in changes else "mean"

    def feature(spec):
        if spec.kind == "single":
            return SparseFeature(
                spec.name, vocab_size=sizes[spec.name], embed_dim=embedding_dim, **extra
            )
        return SequenceFeature(
            spec.name,
            vocab_size=sizes[spec.name],
            embed_dim=embedding_dim,
            pooling=pooling,
            padding_idx=0,
            **extra,
        )

    user = [feature(s) for s in fields.fields if s.name.startswith("user_")]
    item = [feature(s) for s in fields.fields if not s.name.startswith("user_")]
    tower = {"dims": list(hidden_dims), "activation": "relu", "dropout": 0.0}
    model = ESMM(user, item, cvr_params=dict(tower), ctr_params=dict(tower))
    if "no-batchnorm" in changes:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm1d):
                    setattr(parent, name, torch.nn.Identity())
    return model


def decay_all_but_embeddings(model, lr: float = 1e-3, weight_decay: float = 1e-5):
    """torch-rechub's default Adam (lr 1e-3, weight decay 1e-5) with no decay on the
    embedding tables (the ``no-embedding-decay`` change)."""
    import torch

    embeddings = [p for n, p in model.named_parameters() if n.startswith("embedding.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    return torch.optim.Adam(
        [
            {"params": rest, "weight_decay": weight_decay},
            {"params": embeddings, "weight_decay": 0.0},
        ],
        lr=lr,
    )


class _Optimizers:
    """Several optimizers stepped as one (MTLTrainer steps ``self.optimizer`` once a batch)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"param_groups": self.param_groups}


def project_optimizer(model, optim, lr_scale: float, kind: str):
    """The project's learning rates (``optim.lr`` for the towers, ``optim.sparse_lr`` for the
    embeddings, times ``lr_scale``) on torch-rechub's model: one dense Adam (``project``), or
    the project's SparseAdam on sparse embedding gradients plus Adam (``project-sparse``)."""
    import torch

    embeddings = [p for n, p in model.named_parameters() if n.startswith("embedding.")]
    towers = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    betas, eps = tuple(optim.betas), optim.eps
    if kind == "project":
        return torch.optim.Adam(
            [
                {"params": towers, "lr": optim.lr * lr_scale},
                {"params": embeddings, "lr": optim.sparse_lr * lr_scale},
            ],
            betas=betas,
            eps=eps,
        )
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.sparse = True  # F.embedding(..., sparse=True): gradients of looked-up rows
    return _Optimizers(
        torch.optim.Adam(towers, lr=optim.lr * lr_scale, betas=betas, eps=eps),
        torch.optim.SparseAdam(embeddings, lr=optim.sparse_lr * lr_scale, betas=betas, eps=eps),
    )


def _loader(split: dict, fields: FieldsConfig, batch_size: int, shuffle: bool, seed: int):
    import torch
    from torch.utils.data import DataLoader
    from torch_rechub.utils.data import TorchDataset

    x = {f.name: split[f.name] for f in fields.fields}
    # ESMM's outputs are (pCVR, pCTR, pCTCVR); its loss reads the last two labels
    y = np.stack(
        [split[CONVERSION], split[CLICK], split[CLICK] * split[CONVERSION]], axis=1
    ).astype(np.float32)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TorchDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def predict(model, split: dict, fields: FieldsConfig, batch_size: int, oracle) -> dict:
    """The arrays :func:`esmm.metrics.evaluate_predictions` reads, over the whole split."""
    import torch

    model.eval()
    scores = []
    with torch.no_grad():
        for x, _ in _loader(split, fields, batch_size, shuffle=False, seed=0):
            scores.append(model(x).numpy().astype(np.float64))
    out = np.concatenate(scores)
    arrays = {
        CLICK: split[CLICK].astype(np.float64),
        CONVERSION: split[CONVERSION].astype(np.float64),
        "pcvr": out[:, 0],
        "pctr": out[:, 1],
        "pctcvr": out[:, 2],
    }
    if oracle is not None:
        truth = oracle.reindex(split[IMPRESSION_ID])
        if truth["pcvr"].isna().any():
            raise ValueError(f"{int(truth['pcvr'].isna().sum())} impressions have no oracle row")
        arrays["oracle_pctr"] = truth["pctr"].to_numpy(np.float64)
        arrays["oracle_pcvr"] = truth["pcvr"].to_numpy(np.float64)
        arrays["conversion_if_clicked"] = truth["conversion_if_clicked"].to_numpy(np.float64)
    return arrays


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from esmm.train import KEPT, TrainConfig, write_summary

    try:
        cfg = load_config(args.config, TrainConfig, args.overrides)
        fields = load_config(cfg.fields_config, FieldsConfig)
        train_days = parse_partitions(args.train_dates, "--train-dates")
        valid_days = parse_partitions(args.valid_date, "--valid-date")
        test_days = parse_partitions(args.eval_date, "--eval-date")
    except (ConfigError, DateError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    import mlflow
    import torch
    from torch_rechub.trainers import MTLTrainer

    from esmm.evaluation import load_oracle
    from esmm.metrics import evaluate_predictions
    from esmm.selection import EpochRule
    from esmm.tracking import default_artifact_location, resolve_tracking_uri

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    started = time.monotonic()
    train = read_split(args.features, train_days, fields)
    valid = read_split(args.features, valid_days, fields)
    test = read_split(args.features, test_days, fields)
    oracle = load_oracle(args.oracle, valid_days + test_days) if args.oracle else None
    sizes = compact_ids([train, valid, test], fields)
    model = build_reference_model(
        fields, cfg.model.embedding_dim, cfg.model.hidden_dims, sizes, args.change
    )
    trainer = MTLTrainer(model, task_types=["classification"] * 3, device="cpu")
    if args.optimizer != "torch-rechub":
        if "no-embedding-decay" in args.change:
            print(f"{PROG}: error: --change no-embedding-decay is of torch-rechub's optimizer; "
                  f"--optimizer {args.optimizer} has no decay anyway", file=sys.stderr)  # fmt: skip
            return 2
        trainer.optimizer = project_optimizer(model, cfg.optim, args.lr_scale, args.optimizer)
    elif "no-embedding-decay" in args.change:
        trainer.optimizer = decay_all_but_embeddings(model)
    rule = EpochRule(cfg.selection)

    uri = resolve_tracking_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        client.create_experiment(
            cfg.tracking.experiment, artifact_location=default_artifact_location(uri)
        )
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"implementation": "torch-rechub", "variant": "esmm"}
    parent = args.parent_run_id or cfg.tracking.parent_run_id
    if parent and parent != "None":
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=args.run_name, tags=tags) as run:
        mlflow.log_params(
            {
                "implementation": "torch_rechub.models.multi_task.ESMM",
                "train_dates": args.train_dates,
                "valid_date": args.valid_date,
                "eval_date": args.eval_date,
                "epochs": cfg.epochs,
                "seed": cfg.seed,
                "batch_size": cfg.data.batch_size,
                "embedding_dim": cfg.model.embedding_dim,
                "hidden_dims": str(cfg.model.hidden_dims),
                "changes": ",".join(args.change) or "none",
                "optimizer": {
                    "torch-rechub": "Adam lr=1e-3 weight_decay=1e-5 (torch-rechub's default)",
                    "project": f"Adam lr={cfg.optim.lr * args.lr_scale:g} (towers), "
                    f"{cfg.optim.sparse_lr * args.lr_scale:g} (embeddings) (the project's)",
                    "project-sparse": f"Adam lr={cfg.optim.lr * args.lr_scale:g} (towers), "
                    f"SparseAdam lr={cfg.optim.sparse_lr * args.lr_scale:g} (embeddings) "
                    "(the project's)",
                }[args.optimizer],
            }
        )
        best_state, epochs_trained = None, 0
        for epoch in range(cfg.epochs):
            loader = _loader(train, fields, cfg.data.batch_size, True, cfg.seed + epoch)
            trainer.train_one_epoch(loader)
            epochs_trained = epoch + 1
            metrics = evaluate_predictions(
                predict(model, valid, fields, cfg.data.eval_batch_size, oracle)
            )
            kept = rule.update(epoch, metrics)
            mlflow.log_metrics({f"valid_{k}": v for k, v in metrics.items()}, step=epoch + 1)
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: valid cvr_auc={metrics['cvr_auc']:.4f} "
                f"ctr_auc={metrics['ctr_auc']:.4f}" + (" (kept so far)" if kept else ""),
                file=sys.stderr,
            )
            if kept:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if rule.should_stop:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        metrics = evaluate_predictions(
            predict(model, test, fields, cfg.data.eval_batch_size, oracle)
        )
        kept_epoch = epochs_trained if rule.best_epoch is None else rule.best_epoch + 1
        metrics["kept_epoch"] = float(kept_epoch)
        metrics["epochs_trained"] = float(epochs_trained)
        metrics.update({f"kept_valid_{k}": v for k, v in rule.best_metrics.items() if k in KEPT})
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=kept_epoch)
        mlflow.log_metric("wall_clock_s", time.monotonic() - started)
        write_summary(Path(args.summary_json), run.info.run_id, None, metrics)
    print(
        f"{PROG}: kept epoch {kept_epoch} of {epochs_trained}; test: "
        + " ".join(f"{k}={metrics[k]:.4f}" for k in ("ctr_auc", "cvr_auc", "ctcvr_auc")),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
