"""Typed configuration of the Spark jobs: the funnel simulator and the feature job.

Both are loaded with :func:`contract.config.load_config` (the one YAML loader), so an unknown key,
a wrong type or an out-of-range rate ends in one :class:`contract.config.ConfigError` naming the
file and the key.

- ``conf/simulator.yaml`` → :class:`SimulatorConfig` (presets of :class:`SimulatorPreset`);
- ``conf/features.yaml`` → :class:`FeaturesConfig`.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from contract.config import StrictModel

__all__ = [
    "AttributionConfig",
    "DirtRates",
    "FeaturesConfig",
    "FunnelModel",
    "OutputConfig",
    "Population",
    "ProfileJoin",
    "SimulatorConfig",
    "SimulatorPreset",
    "Timing",
]

Rate = Field(default=0.0, ge=0.0, le=1.0)


class Population(StrictModel):
    """Who and what the simulated marketplace holds.

    ``*_popularity_skew`` is the exponent ``a`` of the draw ``index = floor(N * u**a)`` with
    ``u`` uniform: ``a = 1`` is uniform popularity, larger ``a`` concentrates impressions on a
    head of popular users/items with a long power-law tail (density ∝ x**(1/a - 1)).
    """

    num_users: int = Field(ge=1)
    num_items: int = Field(ge=1)
    num_categories: int = Field(default=200, ge=1)
    shops_per_category: int = Field(default=20, ge=1)
    num_brands: int = Field(default=2000, ge=1)
    user_popularity_skew: float = Field(default=2.0, ge=1.0)
    item_popularity_skew: float = Field(default=2.5, ge=1.0)
    category_popularity_skew: float = Field(default=1.5, ge=1.0)
    # Longer than the feature table's max_len on purpose, so truncation is exercised.
    max_recent_bag: int = Field(default=12, ge=0)
    max_position: int = Field(default=20, ge=1)


class FunnelModel(StrictModel):
    """The latent model behind click and conversion probabilities (see docs/DATA.md).

    ``selection_bias`` (0..1) is the one knob of the sample-selection bias: it sets
    ``kappa = kappa_max * selection_bias`` (attractiveness drives clicks but hurts purchases)
    and ``gamma = 1 - gamma_drop * selection_bias`` (user-item fit matters less for purchases
    than for clicks). At 0 what drives clicks and purchases is the same; at 1 they differ most.
    """

    latent_dim: int = Field(default=6, ge=1, le=16)
    click_bias: float
    cvr_bias: float
    affinity_scale: float = 1.5
    attractiveness_scale: float = 1.0
    position_decay: float = 0.4
    quality_scale: float = 0.8
    price_sensitivity: float = 0.4
    selection_bias: float = Field(default=0.5, ge=0.0, le=1.0)
    kappa_max: float = Field(default=1.5, ge=0.0)
    gamma_drop: float = Field(default=0.75, ge=0.0, le=1.0)


class Timing(StrictModel):
    """Delays between funnel events, in seconds.

    Genuine clicks and conversions always fall inside the attribution windows (which should
    equal ``conf/features.yaml``'s); only the ``outside_window`` dirt lands beyond them.
    """

    click_delay_mean_s: float = Field(default=60.0, gt=0)
    conversion_delay_mean_s: float = Field(default=3600.0, gt=0)
    click_window_s: int = Field(default=3600, ge=1)
    conversion_window_s: int = Field(default=86400, ge=1)


class DirtRates(StrictModel):
    """Rates of each kind of dirt, as a share of the records of the relevant log."""

    malformed_line: float = Rate
    missing_key: float = Rate
    null_user_id: float = Rate
    duplicate_event: float = Rate
    click_unknown_impression: float = Rate
    conversion_unknown_click: float = Rate
    conversion_before_click: float = Rate
    late_event: float = Rate
    outside_window: float = Rate
    repeat_click: float = Rate
    missing_profile: float = Rate


class SimulatorPreset(StrictModel):
    """One named scale + funnel + dirt setting of the simulator."""

    impressions_per_day: int = Field(ge=1)
    population: Population
    funnel: FunnelModel
    timing: Timing = Timing()
    dirt: DirtRates = DirtRates()


class SimulatorConfig(StrictModel):
    """``conf/simulator.yaml``: named presets; ``--preset`` picks one."""

    presets: dict[str, SimulatorPreset] = Field(min_length=1)

    def preset(self, name: str) -> SimulatorPreset:
        """The preset called ``name``; KeyError naming the known presets otherwise."""
        if name not in self.presets:
            raise KeyError(f"no preset '{name}'; known: {', '.join(sorted(self.presets))}")
        return self.presets[name]


class AttributionConfig(StrictModel):
    """Attribution windows of the feature job.

    A click counts only within ``click_window_s`` after its impression, a conversion only
    within ``conversion_window_s`` after its click. ``late_arrival_days`` is how many days
    after the event time a record may still sit in a later day's folder.
    """

    click_window_s: int = Field(default=3600, ge=1)
    conversion_window_s: int = Field(default=86400, ge=1)
    late_arrival_days: int = Field(default=1, ge=0)

    @property
    def horizon_days(self) -> int:
        """How many folders after the impression day a build reads (and before it, to skip)."""
        windows = self.click_window_s + self.conversion_window_s
        return math.ceil(windows / 86400) + self.late_arrival_days


class OutputConfig(StrictModel):
    """Parquet layout of the feature table, sized for Petastorm row-group sharding."""

    rows_per_row_group: int = Field(default=100_000, ge=1)
    # Horovod ranks shard by whole row groups: even a small day gets this many.
    min_row_groups: int = Field(default=4, ge=1)
    parquet_block_size_bytes: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)


class ProfileJoin(StrictModel):
    """How a profile snapshot joins the impressions: ``impressions.<impression_key> = <key>``.

    ``broadcast`` ships the (hashed) snapshot to every executor, so the day's impressions are
    not shuffled for the join; set it false for a snapshot too big for executor memory (the
    join then shuffles the day by the key).
    """

    key: str
    impression_key: str
    broadcast: bool = True


class FeaturesConfig(StrictModel):
    """``conf/features.yaml``: the feature job's settings."""

    attribution: AttributionConfig = AttributionConfig()
    output: OutputConfig = OutputConfig()
    profiles: dict[str, ProfileJoin] = Field(
        default_factory=lambda: {
            "users": ProfileJoin(key="user_id", impression_key="user_id"),
            "items": ProfileJoin(key="item_id", impression_key="item_id"),
        }
    )
    shuffle_partitions: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _impressions_is_not_a_profile(self) -> FeaturesConfig:
        if "impressions" in self.profiles:
            raise ValueError("'impressions' is the fact log, not a profile snapshot")
        return self
