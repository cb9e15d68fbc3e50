"""A funnel simulator: synthetic impressions → clicks → conversions with a known truth.

Everything is generated from ``spark.range`` and every random draw is a pure function of
``(seed, stream name, row id)`` through Spark's built-in ``xxhash64`` (see :func:`uniform`),
so the output depends on the seed and the scale only, never on the number of partitions or
executors, and nothing is collected to the driver: it scales with the cluster.

The latent model (documented in docs/DATA.md): users have an interest vector (the mean of
the topic vectors of the categories in their recent-behaviour bag, plus noise) and a
purchasing power; items have a topic vector (their category's topic plus noise), a price
level, a quality and an attractiveness. Then

    click logit = click_bias + a·(interest·topic) + attractiveness − position/context effects
    cvr logit   = cvr_bias + γ·a·(interest·topic) + quality − price above purchasing power
                  − κ·attractiveness

with ``κ`` and ``γ`` set by the one ``selection_bias`` knob. The conversion label of EVERY
impression is drawn once from its pCVR; the observed conversion is that draw AND the click.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from features.config import DirtRates, SimulatorPreset

__all__ = [
    "SimulatedLogs",
    "normal",
    "simulate",
    "simulate_items",
    "simulate_users",
    "uniform",
]

_TWO_POW_53 = 1 << 53
_DEVICES = ("ios", "android", "pc", "h5")
_GENDERS = ("f", "m", "unknown")


def uniform(seed: int, stream: str, *keys: str) -> str:
    """SQL expression of a uniform draw in [0, 1) keyed by ``(seed, stream, *keys)``.

    ``keys`` are SQL expressions (column names, lambda variables). The 64-bit hash is reduced
    to 53 bits so that the division is exact in a double.
    """
    key_sql = ", ".join(keys)
    return (
        f"(pmod(xxhash64({int(seed)}L, '{stream}', {key_sql}), {_TWO_POW_53}L) / {_TWO_POW_53}.0D)"
    )


def normal(seed: int, stream: str, *keys: str) -> str:
    """SQL expression of a standard normal draw (Box-Muller over two :func:`uniform` draws)."""
    u1 = uniform(seed, f"{stream}#1", *keys)
    u2 = uniform(seed, f"{stream}#2", *keys)
    return f"(sqrt(-2.0D * ln(1.0D - {u1})) * cos(2.0D * pi() * {u2}))"


def _power_law_index(seed: int, stream: str, key: str, n: int, skew: float) -> str:
    """An index in ``0 .. n-1`` drawn with a Zipf-like head (see Population's docstring)."""
    return (
        f"least(CAST(floor({n}D * pow({uniform(seed, stream, key)}, {skew}D)) AS BIGINT), {n - 1}L)"
    )


def _choice(values: tuple[str, ...], u_sql: str) -> str:
    """SQL picking one of ``values`` uniformly from a uniform draw."""
    array = ", ".join(f"'{v}'" for v in values)
    return f"element_at(array({array}), CAST(floor({u_sql} * {len(values)}) AS INT) + 1)"


def _category_topic(seed: int, dim: int, category_sql: str) -> str:
    """Topic coordinate ``dim`` of a category: a deterministic function of the category id."""
    return normal(seed, f"category_topic_{dim}", category_sql)


def simulate_users(spark: SparkSession, preset: SimulatorPreset, seed: int) -> DataFrame:
    """The user population with its latent columns.

    Returns:
        ``user_idx`` (long), the profile columns of ``conf/fields.yaml`` (``user_id``,
        ``gender``, ``age_bucket``, ``purchase_power``, ``city_tier``, ``recent_categories``,
        ``recent_shops``; bags of variable length, possibly empty) and the latent
        ``interest_0 .. interest_{d-1}``.
    """
    pop, d = preset.population, preset.funnel.latent_dim
    users = spark.range(pop.num_users).withColumnRenamed("id", "user_idx")
    bag_len = (
        f"CAST(floor({uniform(seed, 'bag_len', 'user_idx')} * {pop.max_recent_bag + 1}) AS INT)"
    )
    bag_cats = (
        f"transform(slice(sequence(0, {max(pop.max_recent_bag, 1) - 1}), 1, {bag_len}), "
        "k -> "
        + _power_law_index(
            seed, "bag_cat", "user_idx, k", pop.num_categories, pop.category_popularity_skew
        )
        + ")"
    )
    users = users.select(
        "user_idx",
        F.concat(F.lit("u"), F.col("user_idx")).alias("user_id"),
        F.expr(_choice(_GENDERS, uniform(seed, "gender", "user_idx"))).alias("gender"),
        F.expr(f"CAST(1 + floor({uniform(seed, 'age', 'user_idx')} * 8) AS INT)").alias(
            "age_bucket"
        ),
        F.expr(f"CAST(1 + floor({uniform(seed, 'power', 'user_idx')} * 10) AS INT)").alias(
            "purchase_power"
        ),
        F.expr(f"CAST(1 + floor({uniform(seed, 'city', 'user_idx')} * 5) AS INT)").alias(
            "city_tier"
        ),
        F.expr(bag_cats).alias("_bag"),
    )
    interests = []
    for j in range(d):
        # The interest vector is where the bag came from: the mean topic of the bag's
        # categories, plus individual noise (an empty bag leaves the noise only).
        topic_sum = f"aggregate(_bag, 0.0D, (acc, c) -> acc + {_category_topic(seed, j, 'c')})"
        interests.append(
            F.expr(
                f"{topic_sum} / greatest(size(_bag), 1)"
                f" + 0.5D * {normal(seed, f'interest_{j}', 'user_idx')}"
            ).alias(f"interest_{j}")
        )
    shop = (
        f"concat('s', c, '_', CAST(floor({uniform(seed, 'bag_shop', 'user_idx', 'c')} * "
        f"{pop.shops_per_category}) AS BIGINT))"
    )
    return users.select(
        "user_idx",
        "user_id",
        "gender",
        "age_bucket",
        "purchase_power",
        "city_tier",
        F.expr("transform(_bag, c -> concat('c', c))").alias("recent_categories"),
        F.expr(f"transform(_bag, c -> {shop})").alias("recent_shops"),
        *interests,
    )


def simulate_items(spark: SparkSession, preset: SimulatorPreset, seed: int) -> DataFrame:
    """The item catalogue with its latent columns.

    Returns:
        ``item_idx``, the profile columns (``item_id``, ``category``, ``shop``, ``brand``,
        ``price_level``) and the latent ``topic_0 .. topic_{d-1}``, ``quality``,
        ``attractiveness``.
    """
    pop, d = preset.population, preset.funnel.latent_dim
    items = spark.range(pop.num_items).withColumnRenamed("id", "item_idx")
    items = items.withColumn(
        "_cat",
        F.expr(
            _power_law_index(
                seed, "item_cat", "item_idx", pop.num_categories, pop.category_popularity_skew
            )
        ),
    )
    topics = [
        F.expr(
            f"{_category_topic(seed, j, '_cat')} + 0.5D * {normal(seed, f'topic_{j}', 'item_idx')}"
        ).alias(f"topic_{j}")
        for j in range(d)
    ]
    return items.select(
        "item_idx",
        F.concat(F.lit("i"), F.col("item_idx")).alias("item_id"),
        F.concat(F.lit("c"), F.col("_cat")).alias("category"),
        F.expr(
            f"concat('s', _cat, '_', CAST(floor({uniform(seed, 'shop', 'item_idx')} * "
            f"{pop.shops_per_category}) AS BIGINT))"
        ).alias("shop"),
        F.expr(
            f"concat('b', {_power_law_index(seed, 'brand', 'item_idx', pop.num_brands, 1.5)})"
        ).alias("brand"),
        F.expr(f"CAST(1 + floor({uniform(seed, 'price', 'item_idx')} * 10) AS INT)").alias(
            "price_level"
        ),
        *topics,
        F.expr(normal(seed, "quality", "item_idx")).alias("quality"),
        F.expr(normal(seed, "attractiveness", "item_idx")).alias("attractiveness"),
    )


@dataclass(frozen=True)
class SimulatedLogs:
    """The simulator's outputs, each with a string ``dt`` partition column.

    ``impressions``, ``clicks`` and ``conversions`` hold one JSON line per row in ``value``
    (``dt`` is the folder the line lands in: late events land after their event day);
    ``users`` and ``items`` are the daily profile snapshots; ``oracle`` the ground truth.
    """

    impressions: DataFrame
    clicks: DataFrame
    conversions: DataFrame
    users: DataFrame
    items: DataFrame
    oracle: DataFrame


def _day_of(ts: str) -> str:
    return f"date_format(timestamp_seconds({ts}), 'yyyy-MM-dd')"


def _folder(ts: str, late: str) -> Column:
    """The folder an event lands in: its event day, one day later when it arrives late."""
    return F.expr(
        f"date_format(date_add(to_date(timestamp_seconds({ts})), IF({late}, 1, 0)), 'yyyy-MM-dd')"
    )


def simulate(
    spark: SparkSession,
    preset: SimulatorPreset,
    start_date: dt.date,
    days: int,
    seed: int,
    partitions: int | None = None,
) -> SimulatedLogs:
    """Build (lazily) every raw log and the oracle for ``days`` days from ``start_date``.

    Row ``id`` of ``spark.range(days * impressions_per_day)`` is impression ``id mod n`` of
    day ``id div n``; every draw is keyed by that id, so a day's data does not depend on how
    many days are generated after it, nor on ``partitions`` (the range's partition count).
    """
    pop, fun, tim, dirt = preset.population, preset.funnel, preset.timing, preset.dirt
    d = fun.latent_dim
    n = preset.impressions_per_day
    start_epoch = int(
        dt.datetime(start_date.year, start_date.month, start_date.day, tzinfo=dt.UTC).timestamp()
    )

    def u(stream: str) -> str:
        return uniform(seed, stream, "id")

    users = simulate_users(spark, preset, seed)
    items = simulate_items(spark, preset, seed)

    base = spark.range(0, days * n, 1, partitions).select(
        "id",
        (F.col("id") % n).alias("n"),
        F.expr(f"{start_epoch}L + (id DIV {n}) * 86400L").alias("day_start"),
        F.expr(_power_law_index(seed, "user", "id", pop.num_users, pop.user_popularity_skew)).alias(
            "user_idx"
        ),
        F.expr(_power_law_index(seed, "item", "id", pop.num_items, pop.item_popularity_skew)).alias(
            "item_idx"
        ),
        F.expr(f"CAST(1 + floor({pop.max_position}D * pow({u('position')}, 2.0D)) AS INT)").alias(
            "position"
        ),
        F.expr(f"CAST(floor(24 * {u('hour')}) AS INT)").alias("hour"),
        F.expr(_choice(_DEVICES, u("device"))).alias("device"),
    )
    base = base.withColumn("dt", F.expr("date_format(timestamp_seconds(day_start), 'yyyy-MM-dd')"))
    base = base.withColumn(
        "impression_id",
        F.concat(F.lit("imp-"), F.regexp_replace("dt", "-", ""), F.lit("-"), F.col("n")),
    )
    base = base.withColumn(
        "ts", F.expr(f"day_start + hour * 3600L + CAST(floor({u('second')} * 3600) AS BIGINT)")
    )

    kappa = fun.kappa_max * fun.selection_bias
    gamma = 1.0 - fun.gamma_drop * fun.selection_bias
    affinity = " + ".join(f"interest_{j} * topic_{j}" for j in range(d))
    joined = base.join(users, "user_idx").join(items, "item_idx")
    joined = joined.withColumn("affinity", F.expr(f"({affinity}) / sqrt({d}D)"))
    click_logit = (
        f"{fun.click_bias}D + {fun.affinity_scale}D * affinity"
        f" + {fun.attractiveness_scale}D * attractiveness"
        f" - {fun.position_decay}D * ln(position)"
        " + CASE device WHEN 'ios' THEN 0.1D WHEN 'pc' THEN -0.2D ELSE 0.0D END"
        " + 0.2D * sin(2.0D * pi() * hour / 24.0D)"
    )
    cvr_logit = (
        f"{fun.cvr_bias}D + {gamma * fun.affinity_scale}D * affinity"
        f" + {fun.quality_scale}D * quality"
        f" - {fun.price_sensitivity}D * greatest(price_level - purchase_power, 0)"
        f" - {kappa * fun.attractiveness_scale}D * attractiveness"
    )
    truth = joined.select(
        "id",
        "dt",
        "impression_id",
        "ts",
        "user_id",
        "item_id",
        "position",
        "hour",
        "device",
        F.expr(f"1.0D / (1.0D + exp(-({click_logit})))").alias("pctr"),
        F.expr(f"1.0D / (1.0D + exp(-({cvr_logit})))").alias("pcvr"),
    )
    truth = truth.withColumn("click", F.expr(f"CAST({u('click')} < pctr AS INT)")).withColumn(
        "conversion_if_clicked", F.expr(f"CAST({u('conversion')} < pcvr AS INT)")
    )
    truth = truth.withColumn(
        "click_ts",
        F.expr(
            f"ts + least(1L + CAST(floor(-{tim.click_delay_mean_s}D"
            f" * ln(1.0D - {u('click_delay')})) AS BIGINT),"
            f" {tim.click_window_s - 1}L)"
        ),
    ).withColumn(
        "conversion_ts",
        F.expr(
            "click_ts + least(1L + CAST(floor(-"
            f"{tim.conversion_delay_mean_s}D * ln(1.0D - {u('conversion_delay')})) AS BIGINT),"
            f" {tim.conversion_window_s - 1}L)"
        ),
    )
    truth = truth.persist()

    oracle = truth.select("impression_id", "pctr", "pcvr", "click", "conversion_if_clicked", "dt")

    impressions = _impression_lines(truth, seed, dirt)
    clicks = _click_lines(truth, seed, preset)
    conversions = _conversion_lines(truth, seed, preset)

    dates = spark.range(days).select(
        F.expr(f"date_format(timestamp_seconds({start_epoch}L + id * 86400L), 'yyyy-MM-dd')").alias(
            "dt"
        ),
        F.col("id").alias("day"),
    )

    def snapshot(profiles: DataFrame, key: str, columns: list[str]) -> DataFrame:
        # A share of the population is missing from each day's snapshot: the feature job
        # must give their fields id 0.
        present = F.expr(
            f"{uniform(seed, 'missing_profile', key, 'day')} >= {dirt.missing_profile}D"
        )
        return profiles.crossJoin(dates).where(present).select(*columns, "dt")

    user_columns = [
        "user_id",
        "gender",
        "age_bucket",
        "purchase_power",
        "city_tier",
        "recent_categories",
        "recent_shops",
    ]
    item_columns = ["item_id", "category", "shop", "brand", "price_level"]
    return SimulatedLogs(
        impressions=impressions,
        clicks=clicks,
        conversions=conversions,
        users=snapshot(users, "user_idx", user_columns),
        items=snapshot(items, "item_idx", item_columns),
        oracle=oracle,
    )


def _lines(records: DataFrame, seed: int, rate: float, stream: str) -> DataFrame:
    """Serialise ``records`` (with ``id``, ``dt``) to JSON lines, duplicating a share ``rate``.

    A duplicate is the very same line (same event id), as a collector retry would write it.
    """
    payload = [c for c in records.columns if c not in ("id", "dt")]
    lines = records.select("id", "dt", F.to_json(F.struct(*payload)).alias("value"))
    duplicates = lines.where(F.expr(f"{uniform(seed, stream, 'id')} < {rate}D"))
    return lines.unionByName(duplicates)


def _malformed(records: DataFrame, seed: int, rate: float, stream: str) -> DataFrame:
    """Truncated JSON lines (a collector crash mid-write) for a share ``rate`` of rows."""
    payload = [c for c in records.columns if c not in ("id", "dt")]
    return records.where(F.expr(f"{uniform(seed, stream, 'id')} < {rate}D")).select(
        "id",
        "dt",
        F.expr(f"substring(to_json(struct({', '.join(payload)})), 1, 25)").alias("value"),
    )


def _impression_lines(truth: DataFrame, seed: int, dirt: DirtRates) -> DataFrame:
    records = truth.select(
        "id",
        "dt",
        "impression_id",
        "ts",
        F.expr(
            f"IF({uniform(seed, 'null_user', 'id')} < {dirt.null_user_id}D, NULL, user_id)"
        ).alias("user_id"),
        "item_id",
        "position",
        "hour",
        "device",
    )
    missing_key = records.where(
        F.expr(f"{uniform(seed, 'imp_missing_key', 'id')} < {dirt.missing_key}D")
    ).withColumn("impression_id", F.lit(None).cast("string"))
    return (
        _lines(records, seed, dirt.duplicate_event, "imp_dup")
        .unionByName(_lines(missing_key, seed, 0.0, "none"))
        .unionByName(_malformed(records, seed, dirt.malformed_line, "imp_malformed"))
        .select("dt", "value")
    )


def _click_lines(truth: DataFrame, seed: int, preset: SimulatorPreset) -> DataFrame:
    dirt, tim = preset.dirt, preset.timing

    def late(stream: str) -> str:
        return f"{uniform(seed, stream, 'id')} < {dirt.late_event}D"

    clicked = truth.where("click = 1")
    genuine = clicked.select(
        "id",
        _folder("click_ts", late("click_late")).alias("dt"),
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        "impression_id",
        F.col("click_ts").alias("ts"),
    )
    # A second click (its own event id) on the same impression, inside the window.
    repeat = clicked.where(
        F.expr(f"{uniform(seed, 'repeat_click', 'id')} < {dirt.repeat_click}D")
    ).select(
        "id",
        F.expr(f"{_day_of('click_ts')}").alias("dt"),
        F.concat(F.lit("c2-"), "impression_id").alias("click_id"),
        "impression_id",
        F.expr(f"least(click_ts + 5L, ts + {tim.click_window_s}L)").alias("ts"),
    )
    unclicked = truth.where("click = 0")
    outside = unclicked.where(
        F.expr(f"{uniform(seed, 'click_outside', 'id')} < {dirt.outside_window}D")
    ).select(
        "id",
        F.expr(_day_of(f"ts + {tim.click_window_s + 60}L")).alias("dt"),
        F.concat(F.lit("cw-"), "impression_id").alias("click_id"),
        "impression_id",
        F.expr(f"ts + {tim.click_window_s + 60}L").alias("ts"),
    )
    unknown = truth.where(
        F.expr(f"{uniform(seed, 'click_unknown', 'id')} < {dirt.click_unknown_impression}D")
    ).select(
        "id",
        "dt",
        F.concat(F.lit("cu-"), "impression_id").alias("click_id"),
        F.concat(F.lit("ghost-"), "impression_id").alias("impression_id"),
        "ts",
    )
    missing_key = truth.where(
        F.expr(f"{uniform(seed, 'click_missing_key', 'id')} < {dirt.missing_key}D")
    ).select(
        "id",
        "dt",
        F.concat(F.lit("ck-"), "impression_id").alias("click_id"),
        F.lit(None).cast("string").alias("impression_id"),
        "ts",
    )
    real = genuine.unionByName(repeat).unionByName(outside)
    # Dirt that cannot be tied to an impression stays in the generation day's folder, so a
    # contiguous range of builds accounts for every line the simulator wrote.
    in_day_clicks = clicked.select(
        "id",
        "dt",
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        "impression_id",
        F.col("click_ts").alias("ts"),
    )
    return (
        _lines(real, seed, dirt.duplicate_event, "click_dup")
        .unionByName(_lines(unknown.unionByName(missing_key), seed, 0.0, "none"))
        .unionByName(_malformed(in_day_clicks, seed, dirt.malformed_line, "click_malformed"))
        .select("dt", "value")
    )


def _conversion_lines(truth: DataFrame, seed: int, preset: SimulatorPreset) -> DataFrame:
    dirt, tim = preset.dirt, preset.timing
    clicked = truth.where("click = 1")
    converted = clicked.where("conversion_if_clicked = 1")
    genuine = converted.select(
        "id",
        _folder(
            "conversion_ts", f"{uniform(seed, 'conversion_late', 'id')} < {dirt.late_event}D"
        ).alias("dt"),
        F.concat(F.lit("v-"), "impression_id").alias("conversion_id"),
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        F.col("conversion_ts").alias("ts"),
    )
    click_folder = _folder("click_ts", f"{uniform(seed, 'click_late', 'id')} < {dirt.late_event}D")
    before = clicked.where(
        F.expr(f"{uniform(seed, 'conversion_before', 'id')} < {dirt.conversion_before_click}D")
    ).select(
        "id",
        click_folder.alias("dt"),
        F.concat(F.lit("vb-"), "impression_id").alias("conversion_id"),
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        F.expr("click_ts - 30L").alias("ts"),
    )
    outside_ts = f"click_ts + {tim.conversion_window_s + 60}L"
    outside = clicked.where(
        F.expr(f"{uniform(seed, 'conversion_outside', 'id')} < {dirt.outside_window}D")
    ).select(
        "id",
        F.expr(_day_of(outside_ts)).alias("dt"),
        F.concat(F.lit("vw-"), "impression_id").alias("conversion_id"),
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        F.expr(outside_ts).alias("ts"),
    )
    unknown = truth.where(
        F.expr(f"{uniform(seed, 'conversion_unknown', 'id')} < {dirt.conversion_unknown_click}D")
    ).select(
        "id",
        "dt",
        F.concat(F.lit("vu-"), "impression_id").alias("conversion_id"),
        F.concat(F.lit("ghost-click-"), "impression_id").alias("click_id"),
        "ts",
    )
    missing_key = truth.where(
        F.expr(f"{uniform(seed, 'conversion_missing_key', 'id')} < {dirt.missing_key}D")
    ).select(
        "id",
        "dt",
        F.concat(F.lit("vk-"), "impression_id").alias("conversion_id"),
        F.lit(None).cast("string").alias("click_id"),
        "ts",
    )
    real = genuine.unionByName(before).unionByName(outside)
    in_day_conversions = converted.select(
        "id",
        "dt",
        F.concat(F.lit("v-"), "impression_id").alias("conversion_id"),
        F.concat(F.lit("c-"), "impression_id").alias("click_id"),
        F.col("conversion_ts").alias("ts"),
    )
    return (
        _lines(real, seed, dirt.duplicate_event, "conversion_dup")
        .unionByName(_lines(unknown.unionByName(missing_key), seed, 0.0, "none"))
        .unionByName(
            _malformed(in_day_conversions, seed, dirt.malformed_line, "conversion_malformed")
        )
        .select("dt", "value")
    )
