"""The ESMM network and the paper's baselines, built from the field list in ``conf/``.

Small modules, composed per variant by :func:`build_model`:

- :class:`FieldEmbedding`: one table for one field (``nn.Embedding`` for a single id,
  ``nn.EmbeddingBag(mode="sum", padding_idx=0)`` for a bag of ids);
- :class:`EmbeddingCollection`: one :class:`FieldEmbedding` per field, concatenated;
- :class:`MLP`: a stack of Linear+ReLU layers (each followed by Dropout when configured);
- :class:`Tower`: an :class:`MLP` and a 1-logit output layer (the paper's 360×200×80×2 with
  the 2-way softmax written as one logit);
- :class:`ESMMModel`: a CTR tower and a second tower (CVR, or CTCVR for ``division``) over one
  shared or two separate embedding collections, plus for ``escm2_dr`` an imputation tower;
- :class:`~esmm.admission.IdAdmission` (in :mod:`esmm.admission`): optional per-field remap
  tables (buffers) that send ids seen fewer than ``min_id_count`` times in training to one
  out-of-vocabulary row per field.

Ma et al., "Entire Space Multi-Task Model", SIGIR 2018 (arXiv 1804.07931), Section 2.3:
pCTCVR = pCTR × pCVR, the two towers share the embedding layer. The network knows nothing of
readers or files: it takes a batch ``dict[str, Tensor]`` keyed by field name.

Wang et al., "ESCM²: Entire Space Counterfactual Multi-Task Model", SIGIR 2022 (arXiv
2204.05125), keep ESMM's network and add a counterfactual CVR risk to its loss
(``escm2_ips``, ``escm2_dr``); the doubly robust one needs an imputation tower that predicts
the CVR tower's error.

The losses of each variant live in :mod:`esmm.losses`, the metrics in :mod:`esmm.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from contract.config import StrictModel, neutral_at
from contract.fields import FieldsConfig, FieldSpec
from contract.schema import PADDING_ID
from esmm.admission import IdAdmission

__all__ = [
    "ESCM2_VARIANTS",
    "ESMM_VARIANTS",
    "MLP",
    "SEPARATE_CVR_VARIANTS",
    "SHARED_EMBEDDING_VARIANTS",
    "ESMMModel",
    "EmbeddingCollection",
    "FieldEmbedding",
    "ModelConfig",
    "Tower",
    "Variant",
    "build_model",
    "division_pcvr",
]

Variant = Literal[
    "esmm",
    "esmm_ns",
    "base",
    "aman",
    "oversampling",
    "unbias",
    "division",
    "escm2_ips",
    "escm2_dr",
]

# Variants whose CVR tower is fitted through the CTCVR product over all impressions.
ESMM_VARIANTS: frozenset[str] = frozenset({"esmm", "esmm_ns"})
# Variants with an independent CTR model and a CVR model fitted on (re-weighted) clicks.
SEPARATE_CVR_VARIANTS: frozenset[str] = frozenset({"base", "aman", "oversampling", "unbias"})
# ESMM plus a counterfactual (inverse-propensity or doubly robust) CVR risk on clicks.
ESCM2_VARIANTS: frozenset[str] = frozenset({"escm2_ips", "escm2_dr"})
# Variants whose towers all read one embedding collection.
SHARED_EMBEDDING_VARIANTS: frozenset[str] = frozenset({"esmm"}) | ESCM2_VARIANTS

# Small initial embeddings keep every id's first prediction near the towers' bias, so rare
# ids (seen a handful of times) do not keep large random vectors that the towers must undo.
EMBEDDING_INIT_STD = 0.01


class ModelConfig(StrictModel):
    """The ``model:`` section of the training config. Defaults are the paper's settings.

    Attributes:
        variant: which model of the paper's comparison to build (see :func:`build_model`).
        embedding_dim: size of every field's embedding (paper: 18).
        hidden_dims: the towers' hidden layer sizes (paper: 200, 80).
        sparse_embeddings: embedding tables produce sparse gradients, so a 10M-row table
            does not get a dense gradient for every row each step; pair
            :meth:`ESMMModel.sparse_parameters` with ``torch.optim.SparseAdam`` and
            :meth:`ESMMModel.dense_parameters` with ``torch.optim.Adam``.
        tower_dropout: probability p of ``nn.Dropout(p)`` after each hidden layer's ReLU in
            every tower (identity in ``model.eval()``); 0 builds no Dropout module at all.
        embedding_init_std: the std of the normal distribution every embedding row starts
            from (a multi field's padding row starts, and stays, at zero).
        min_id_count: id admission: an id seen fewer times than this in the training
            partitions is looked up as its field's out-of-vocabulary row (one extra row per
            table, index ``num_buckets``). 0 or 1 is off: no remap buffer, no extra row.
            The trainer counts the ids (:mod:`esmm.admission`) and installs the remap tables
            with :meth:`ESMMModel.set_admission`.
    """

    variant: Variant = "esmm"
    embedding_dim: PositiveInt = 18
    hidden_dims: list[PositiveInt] = Field(default_factory=lambda: [200, 80])
    sparse_embeddings: bool = True
    tower_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    embedding_init_std: float = Field(
        default=EMBEDDING_INIT_STD, ge=0.0, json_schema_extra=neutral_at(EMBEDDING_INIT_STD)
    )
    min_id_count: NonNegativeInt = 0

    @property
    def id_admission(self) -> bool:
        """Whether id admission is on (``min_id_count > 1``)."""
        return self.min_id_count > 1


class FieldEmbedding(nn.Module):
    """The embedding table of one field; a bag of ids is sum-pooled.

    A single-valued field uses ``nn.Embedding``: id 0 ("missing") has its own learned vector,
    because missingness itself can be informative. A multi-valued field uses
    ``nn.EmbeddingBag(mode="sum", padding_idx=0)``: bags are padded with 0 to ``max_len``,
    and the padding must contribute nothing to the sum (paper: multi-valued features are
    pooled by sum).

    Args:
        spec: the field (its ``kind`` and ``num_buckets`` size the table).
        embedding_dim: size of one embedding.
        sparse: produce a sparse gradient (only the looked-up rows).
        oov_row: add one row at index ``num_buckets``, the out-of-vocabulary row of id
            admission (:class:`IdAdmission`), initialised and learned like any other.
        init_std: every row starts from N(0, init_std²); 0 starts them all at zero.

    Call args:
        ids: LongTensor ``[B]`` (single) or ``[B, max_len]`` (multi, 0-padded).

    Returns:
        Tensor ``[B, embedding_dim]``.

    Example:
        >>> from contract.fields import FieldSpec
        >>> spec = FieldSpec(name="tags", kind="multi", source="items.tags",
        ...                  num_buckets=10, max_len=3)
        >>> FieldEmbedding(spec, embedding_dim=4)(torch.tensor([[1, 2, 0]])).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        spec: FieldSpec,
        embedding_dim: int,
        sparse: bool = False,
        oov_row: bool = False,
        init_std: float = EMBEDDING_INIT_STD,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.multi = spec.kind == "multi"
        rows = spec.num_buckets + (1 if oov_row else 0)
        self.table: nn.Embedding | nn.EmbeddingBag
        if spec.kind == "multi":
            self.table = nn.EmbeddingBag(
                rows, embedding_dim, mode="sum", padding_idx=PADDING_ID, sparse=sparse
            )
        else:
            self.table = nn.Embedding(rows, embedding_dim, sparse=sparse)
        nn.init.normal_(self.table.weight, std=init_std)
        if spec.kind == "multi":
            with torch.no_grad():
                self.table.weight[PADDING_ID].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(ids)

    def touched_l2(self, ids: Tensor) -> Tensor:
        """Σ ||E[i]||² over the distinct ids ``i`` in ``ids`` (a multi field's padding id 0
        excluded: it is the zero padding row, not a learned one).

        The rows are looked up with ``F.embedding(..., sparse=table.sparse)``, so with sparse
        tables the gradient is sparse and non-zero on the touched rows only.

        Args:
            ids: LongTensor ``[B]`` or ``[B, max_len]`` (already remapped by admission).

        Returns:
            Scalar Tensor.

        Example:
            >>> from contract.fields import FieldSpec
            >>> spec = FieldSpec(name="u", kind="single", source="users.u", num_buckets=5)
            >>> emb = FieldEmbedding(spec, embedding_dim=2)
            >>> with torch.no_grad():
            ...     _ = emb.table.weight.copy_(torch.arange(10.0).view(5, 2))
            >>> emb.touched_l2(torch.tensor([1, 1, 3]))  # (4 + 9) + (36 + 49)
            tensor(98., grad_fn=<SumBackward0>)
        """
        unique = torch.unique(ids)
        if self.multi:
            unique = unique[unique != PADDING_ID]
        rows = F.embedding(unique, self.table.weight, sparse=self.table.sparse)
        return rows.pow(2).sum()


class EmbeddingCollection(nn.Module):
    """One :class:`FieldEmbedding` per field of the field list, concatenated in list order.

    Args:
        fields: the field list (``conf/fields.yaml``).
        embedding_dim: size of every field's embedding.
        sparse: tables produce sparse gradients (see :class:`ModelConfig`).
        oov_rows: every table gets the out-of-vocabulary row of id admission.
        init_std: the std of every table's initial rows (:class:`FieldEmbedding`).

    Call args:
        batch: mapping from each field name to its ids, ``[B]`` or ``[B, max_len]``; other
            keys (labels) are ignored.

    Returns:
        Tensor ``[B, len(fields) * embedding_dim]``.

    Example:
        >>> from contract.fields import FieldSpec, FieldsConfig
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="user", kind="single", source="users.id", num_buckets=5),
        ...     FieldSpec(name="tags", kind="multi", source="items.tags", num_buckets=9,
        ...               max_len=2)])
        >>> emb = EmbeddingCollection(fields, embedding_dim=3)
        >>> emb({"user": torch.tensor([1, 4]), "tags": torch.tensor([[1, 0], [2, 3]])}).shape
        torch.Size([2, 6])
    """

    def __init__(
        self,
        fields: FieldsConfig,
        embedding_dim: int,
        sparse: bool = False,
        oov_rows: bool = False,
        init_std: float = EMBEDDING_INIT_STD,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                spec.name: FieldEmbedding(
                    spec, embedding_dim, sparse, oov_row=oov_rows, init_std=init_std
                )
                for spec in fields.fields
            }
        )
        self.output_dim = len(fields.fields) * embedding_dim

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([emb(batch[name]) for name, emb in self.embeddings.items()], dim=1)

    def touched_l2(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Σ over fields of :meth:`FieldEmbedding.touched_l2` (a scalar Tensor)."""
        terms = [emb.touched_l2(batch[name]) for name, emb in self.embeddings.items()]
        return torch.stack(terms).sum()


class MLP(nn.Module):
    """A stack of Linear+ReLU layers (an empty stack is the identity).

    Args:
        in_features: input size.
        layer_sizes: output size of each Linear+ReLU layer.
        dropout: p of an ``nn.Dropout`` after each ReLU; 0 adds no module.

    Call args:
        x: Tensor ``[B, in_features]``.

    Returns:
        Tensor ``[B, layer_sizes[-1]]`` (``[B, in_features]`` for an empty stack).

    Example:
        >>> MLP(360, [200, 80])(torch.randn(4, 360)).shape
        torch.Size([4, 80])
        >>> MLP(8, [4], dropout=0.5).layers
        Sequential(
          (0): Linear(in_features=8, out_features=4, bias=True)
          (1): ReLU()
          (2): Dropout(p=0.5, inplace=False)
        )
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in layer_sizes:
            layers += [nn.Linear(in_features, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = size
        self.layers = nn.Sequential(*layers)
        self.output_dim = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Tower(nn.Module):
    """One task's network on top of the embeddings: :class:`MLP` then a 1-logit Linear.

    The paper's "360×200×80×2" is 20 fields × 18 → 200 → 80 → a 2-way softmax, which is the
    same model as one logit with a sigmoid.

    Args:
        in_features: input size (the embedding collection's ``output_dim``).
        hidden_dims: hidden layer sizes.
        dropout: p of the Dropout after each hidden layer (see :class:`MLP`).

    Call args:
        x: Tensor ``[B, in_features]``.

    Returns:
        logit Tensor ``[B]``.

    Example:
        >>> Tower(360, [200, 80])(torch.randn(4, 360)).shape
        torch.Size([4])
    """

    def __init__(self, in_features: int, hidden_dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_features, hidden_dims, dropout)
        self.logit = nn.Linear(self.mlp.output_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(self.mlp(x)).squeeze(-1)


def division_pcvr(ctr_logit: Tensor, ctcvr_logit: Tensor) -> Tensor:
    """DIVISION's pCVR = clamp(pCTCVR / pCTR, 0, 1), computed in log space.

    ``exp(logσ(ctcvr) − logσ(ctr))`` cannot divide by a pCTR that underflowed to 0 (which
    gives inf or NaN); the ratio of two positive numbers is never below 0, so clamping the
    log-ratio at 0 is the whole [0, 1] clamp.

    Args:
        ctr_logit: Tensor ``[B]``.
        ctcvr_logit: Tensor ``[B]``.

    Returns:
        pCVR Tensor ``[B]`` in [0, 1].
    """
    log_ratio = F.logsigmoid(ctcvr_logit) - F.logsigmoid(ctr_logit)
    return torch.exp(log_ratio.clamp(max=0.0))


class ESMMModel(nn.Module):
    """A CTR tower and a second tower over shared or separate embeddings; see :func:`build_model`.

    Args:
        variant: which model of the paper's comparison this is.
        ctr_embedding: embeddings feeding the CTR tower.
        ctr_tower: the CTR tower.
        second_tower: the CVR tower, or for ``division`` the CTCVR tower.
        second_embedding: embeddings feeding the second tower; ``None`` shares
            ``ctr_embedding`` (ESMM), which also looks each id up only once per batch.
        imputation_tower: ``escm2_dr`` only: predicts the CVR tower's per-impression error
            from the second tower's input (the shared embeddings).
        admission: id admission (:class:`IdAdmission`), applied to the ids before every
            lookup; ``None`` (the default) leaves the ids as they are.

    Call args:
        batch: mapping field name → ids (``[B]`` or ``[B, max_len]``); labels are ignored.

    Returns:
        dict of Tensors ``[B]``: ``pctr``, ``pcvr``, ``pctcvr`` (probabilities) and
        ``ctr_logit``; ``cvr_logit`` for every variant but ``division``, which returns
        ``ctcvr_logit`` instead. For every variant but ``division``,
        ``pctcvr = pctr * pcvr`` (paper Eq. (1)); for ``division`` ``pctcvr`` is the CTCVR
        tower's own output and ``pcvr = clamp(pctcvr / pctr, 0, 1)``. With an imputation
        tower also ``imputed_cvr_error``: ê, the predicted BCE(conversion, pCVR) of each
        impression, the tower's raw linear output (not squashed, so that zeroing the last
        layer gives ê ≡ 0, the case where the DR risk is the IPS risk).

    Example:
        >>> from contract.fields import FieldSpec, FieldsConfig
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="user", kind="single", source="users.id", num_buckets=5)])
        >>> model = build_model(fields, ModelConfig(embedding_dim=4, hidden_dims=[8]))
        >>> out = model({"user": torch.tensor([1, 2, 3])})
        >>> out["pctcvr"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        variant: Variant,
        ctr_embedding: EmbeddingCollection,
        ctr_tower: Tower,
        second_tower: Tower,
        second_embedding: EmbeddingCollection | None = None,
        imputation_tower: Tower | None = None,
        admission: IdAdmission | None = None,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.ctr_embedding = ctr_embedding
        self.ctr_tower = ctr_tower
        self.second_embedding = second_embedding
        self.second_tower = second_tower
        self.imputation_tower = imputation_tower
        self.admission = admission

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.admission is not None:
            batch = self.admission(batch)
        ctr_input = self.ctr_embedding(batch)
        second_input = ctr_input if self.second_embedding is None else self.second_embedding(batch)
        ctr_logit = self.ctr_tower(ctr_input)
        second_logit = self.second_tower(second_input)
        pctr = torch.sigmoid(ctr_logit)
        if self.variant == "division":
            return {
                "ctr_logit": ctr_logit,
                "ctcvr_logit": second_logit,
                "pctr": pctr,
                "pcvr": division_pcvr(ctr_logit, second_logit),
                "pctcvr": torch.sigmoid(second_logit),
            }
        pcvr = torch.sigmoid(second_logit)
        outputs = {
            "ctr_logit": ctr_logit,
            "cvr_logit": second_logit,
            "pctr": pctr,
            "pcvr": pcvr,
            "pctcvr": pctr * pcvr,
        }
        if self.imputation_tower is not None:
            outputs["imputed_cvr_error"] = self.imputation_tower(second_input)
        return outputs

    def embedding_l2(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The touched-row ("lazy") L2 penalty of a batch, before its coefficient.

        ``Σ_tables Σ_fields Σ_{distinct ids of the batch} ||E[id]||² / B``: only the rows the
        batch looks up (after admission) are penalised, each once however often it occurs;
        rows not in the batch are not decayed. A multi field's padding row 0 is not counted.
        Both embedding collections count when the towers do not share one. With sparse
        tables the gradient stays sparse (:meth:`FieldEmbedding.touched_l2`).

        Args:
            batch: mapping field name → ids, as for :meth:`forward`.

        Returns:
            Scalar Tensor.

        Example:
            >>> from contract.fields import FieldSpec, FieldsConfig
            >>> fields = FieldsConfig(fields=[
            ...     FieldSpec(name="user", kind="single", source="users.id", num_buckets=5)])
            >>> model = build_model(fields, ModelConfig(embedding_dim=4, hidden_dims=[8]))
            >>> model.embedding_l2({"user": torch.tensor([1, 1, 2])}).shape
            torch.Size([])
        """
        if self.admission is not None:
            batch = self.admission(batch)
        total = self.ctr_embedding.touched_l2(batch)
        if self.second_embedding is not None:
            total = total + self.second_embedding.touched_l2(batch)
        batch_size = batch[next(iter(self.ctr_embedding.embeddings))].shape[0]
        return total / batch_size

    def set_admission(self, tables: Mapping[str, Tensor]) -> None:
        """Install id admission's remap tables (:func:`esmm.admission.admission_tables`).

        Raises:
            ValueError: the model was built without admission (``min_id_count`` ≤ 1), or
                the tables do not fit the field list (:meth:`IdAdmission.set_tables`).
        """
        if self.admission is None:
            raise ValueError("this model was built without id admission (model.min_id_count <= 1)")
        self.admission.set_tables(tables)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables built with ``sparse=True``: train them with ``SparseAdam``."""
        return [
            module.weight
            for module in self.modules()
            if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse
        ]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (towers, dense tables): train them with ``Adam``."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


def build_model(fields: FieldsConfig, cfg: ModelConfig) -> ESMMModel:
    """Build the network of ``cfg.variant`` for the field list ``fields``.

    - ``esmm``: one embedding collection shared by the CTR and CVR towers (paper §2.3).
    - ``esmm_ns``: the same two towers, each with its own embeddings (no sharing).
    - ``base``, ``aman``, ``oversampling``, ``unbias``: a CVR model and a CTR model with
      separate embeddings, so nothing the CTR loss does reaches the CVR model; the CTR model
      only supplies pCTR to evaluate pCTCVR = pCTR × pCVR (and ``unbias``'s propensities).
      The variants differ only in the CVR loss (:mod:`esmm.losses`).
    - ``division``: a CTR model and a CTCVR model with separate embeddings, as the paper
      trains "separately CTR and CTCVR networks"; sharing them would make the baseline a
      multi-task model, which is what it is there to be compared against.
    - ``escm2_ips``: ``esmm``'s network (shared embeddings, CTR and CVR towers); only the
      loss differs (ESCM², Wang et al. SIGIR 2022).
    - ``escm2_dr``: the same plus an imputation :class:`Tower` of the same shape over the
      shared embeddings, whose output ê predicts the CVR tower's error (the doubly robust
      estimator's imputation model).

    Every tower gets ``cfg.tower_dropout``. With ``cfg.min_id_count > 1`` every table gets an
    out-of-vocabulary row and the model an :class:`IdAdmission` whose tables start as
    identity maps: install the trained ones with :meth:`ESMMModel.set_admission`, or load
    them with ``load_state_dict`` (the served model does).

    Args:
        fields: the field list; one embedding table per field.
        cfg: the ``model:`` config section.

    Returns:
        The untrained model.

    Example:
        >>> from contract.fields import FieldSpec, FieldsConfig
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="user", kind="single", source="users.id", num_buckets=5)])
        >>> model = build_model(fields, ModelConfig(variant="base"))
        >>> model.second_embedding is not None
        True
    """

    def embedding() -> EmbeddingCollection:
        return EmbeddingCollection(
            fields,
            cfg.embedding_dim,
            sparse=cfg.sparse_embeddings,
            oov_rows=cfg.id_admission,
            init_std=cfg.embedding_init_std,
        )

    def tower() -> Tower:
        return Tower(in_features, cfg.hidden_dims, dropout=cfg.tower_dropout)

    ctr_embedding = embedding()
    second_embedding = None if cfg.variant in SHARED_EMBEDDING_VARIANTS else embedding()
    in_features = ctr_embedding.output_dim
    imputation_tower = tower() if cfg.variant == "escm2_dr" else None
    return ESMMModel(
        variant=cfg.variant,
        ctr_embedding=ctr_embedding,
        ctr_tower=tower(),
        second_tower=tower(),
        second_embedding=second_embedding,
        imputation_tower=imputation_tower,
        admission=IdAdmission(fields) if cfg.id_admission else None,
    )
