"""The feature job's transforms: pure DataFrame → DataFrame functions, no I/O, no Python UDFs.

The steps, in order (see docs/DATA.md for the rules in prose):

1. :func:`classify_impressions` — quarantine malformed / key-less impressions.
2. :func:`impression_lookup` — for the impression ids that clicks point to: the day each
   belongs to (day D's or a look-back day's), the basis of record ownership, and its time.
3. :func:`attribute_clicks` / :func:`attribute_conversions` — decide which build owns each
   click / conversion record, deduplicate by event id, apply the attribution windows and give
   every owned record a status (``output``, ``deduplicated``, ``quarantined``) and a reason.
4. :func:`rank_impressions`, :func:`deduplicate_impressions` — one row per
   ``impression_id``, partitioned and sorted the way the table is written (the day's only
   shuffle of the impressions).
5. :func:`label_impressions` — ``click`` / ``conversion`` labels (conversion ⇒ click).
6. :func:`hash_profile`, :func:`encode_features` — raw values → hashed integer ids.

**Cost.** The impressions are the big input. They are read twice: once cut down to the few
percent that attribution and the quarantine need (:func:`narrow_impressions`), once for the
table, shuffled once (step 4); everything else joins to them through broadcasts of the
(much smaller) click-side frames.

**Ownership.** Several days' builds read the same click / conversion folder (late events), so
each record is owned by exactly one build: the day of the impression it points to (through
its click, for a conversion) when that day is within ``horizon`` days before the record's
folder day, else the folder's own day. An impression id seen on several days belongs to the
earliest of them within that reach (:func:`_parent_day`). Every build applies the same rule
and only counts the records it owns, so a contiguous range of builds accounts for every
record exactly once.
"""

from __future__ import annotations

import datetime as dt
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from contract.fields import FieldsConfig, FieldSpec
from contract.schema import CLICK, CONVERSION, IMPRESSION_ID
from features.raw import LOG_KEYS, READ_COLUMNS, record_text

__all__ = [
    "DEDUPLICATED",
    "IMPRESSION_QUARANTINE_REASONS",
    "OUTPUT",
    "QUARANTINED",
    "Reason",
    "attribute_clicks",
    "attribute_conversions",
    "classify_impressions",
    "deduplicate_impressions",
    "encode_features",
    "hash_bag",
    "hash_id",
    "hash_profile",
    "impression_lookup",
    "label_impressions",
    "missing_ids",
    "narrow_impressions",
    "rank_impressions",
    "valid_ids",
]

OUTPUT = "output"
QUARANTINED = "quarantined"
DEDUPLICATED = "deduplicated"


class Reason:
    """Reason codes of quarantined and deduplicated records (the ``reason`` column and the
    ``quarantined_by`` / ``deduplicated_by`` keys of the stats), for both feature jobs: the
    daily build (:mod:`features.pipeline`, docs/DATA.md) and the Ali-CCP ingest
    (:mod:`features.aliccp`, docs/ALICCP.md, whose table lists each code's meaning).
    """

    # Both jobs.
    MISSING_KEY = "missing_key"  # a key is missing (Ali-CCP: empty sample / common index)
    # The daily build (JSON-lines logs).
    MALFORMED = "malformed_line"
    DUPLICATE_EVENT = "duplicate_event_id"
    UNKNOWN_IMPRESSION = "unknown_impression"
    CLICK_BEFORE_IMPRESSION = "click_before_impression"
    OUTSIDE_WINDOW = "outside_attribution_window"
    REPEAT_CLICK = "repeat_click_on_impression"
    UNKNOWN_CLICK = "unknown_click"
    CLICK_NOT_ATTRIBUTED = "click_not_attributed"
    CONVERSION_BEFORE_CLICK = "conversion_before_click"
    REPEAT_CONVERSION = "repeat_conversion_on_impression"
    # The Ali-CCP ingest only (CSV lines with feature lists).
    BAD_COLUMN_COUNT = "bad_column_count"  # not 6 (skeleton) / 3 (common) columns
    BAD_LABEL = "bad_label"  # click or buy not 0/1
    BUY_WITHOUT_CLICK = "buy_without_click"
    BAD_FEATURE_NUM = "bad_feature_num"  # not an integer, or != the number of features
    BAD_FEATURE_ENTRY = "bad_feature_entry"  # an entry not field\x02id\x03value
    UNKNOWN_COMMON_FEATURE = "unknown_common_feature"
    DUPLICATE_COMMON_FEATURE = "duplicate_common_feature_index"  # deduplicated, not quarantined


def _day_offset(day_col: str | Column, days: int) -> Column:
    col = F.col(day_col) if isinstance(day_col, str) else day_col
    return F.date_format(F.date_add(F.to_date(col), days), "yyyy-MM-dd")


def _missing_key(log: str) -> Column:
    return reduce(lambda a, b: a | b, [F.col(k).isNull() for k in LOG_KEYS[log]])


# The reasons an impression record is quarantined for, in the order they are checked.
IMPRESSION_QUARANTINE_REASONS = (Reason.MALFORMED, Reason.MISSING_KEY)


def _impression_reason() -> Column:
    return F.when(F.col("malformed"), Reason.MALFORMED).when(
        _missing_key("impressions"), Reason.MISSING_KEY
    )


def classify_impressions(impressions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Split parsed impressions into valid ones and quarantined ones.

    Args:
        impressions: the output of :func:`features.raw.read_log` (or a subset of its rows).

    Returns:
        ``(valid, quarantined)``: ``valid`` has ``impression_id`` and the payload columns of
        every record with its keys, repeats included; ``quarantined`` has ``folder_dt``,
        ``raw``, ``reason``.
    """
    tagged = impressions.withColumn("reason", _impression_reason())
    quarantined = tagged.where(F.col("reason").isNotNull()).select(
        "folder_dt", record_text("impressions").alias("raw"), "reason"
    )
    valid = tagged.where(F.col("reason").isNull()).drop(*READ_COLUMNS, "reason")
    return valid, quarantined


def _referenced(clicks: DataFrame) -> DataFrame:
    """The distinct impression ids that click records name, marked for a broadcast."""
    return F.broadcast(
        clicks.select(IMPRESSION_ID).where(F.col(IMPRESSION_ID).isNotNull()).distinct()
    )


def narrow_impressions(impressions: DataFrame, clicks: DataFrame) -> DataFrame:
    """The day's impression records that attribution and the quarantine need, in one pass:
    every malformed or key-less record, and every record whose id some click names.

    A few percent of the day: the rest of the records only matter to the table, which reads
    the day again (:func:`rank_impressions`). Same columns as ``impressions``.
    """
    named = _referenced(clicks).withColumn("_named", F.lit(True))
    keep = F.col("malformed") | _missing_key("impressions") | F.col("_named").isNotNull()
    return impressions.join(named, IMPRESSION_ID, "left").where(keep).drop("_named")


def rank_impressions(impressions: DataFrame, partitions: int) -> DataFrame:
    """Every parsed impression record with ``reason`` and ``copy``, laid out as the table is
    written: hash-partitioned on ``impression_id`` into ``partitions`` partitions and, within
    each, ordered by ``(xxhash64(impression_id), impression_id)`` — a deterministic order.

    ``copy`` numbers the valid records of one id by their payload ``(ts, …)``: 1 is the copy
    the table keeps (a deterministic choice), 2.. are repeats (deduplicated); it is null for
    quarantined records (``reason`` set). This is the day's one shuffle of the impressions;
    the label and profile joins after it are broadcasts and keep the layout.
    """
    payload = [c for c in impressions.columns if c not in (*READ_COLUMNS, IMPRESSION_ID)]
    tagged = impressions.withColumn("reason", _impression_reason()).withColumn(
        "_bucket", F.xxhash64(IMPRESSION_ID)
    )
    # The hash leads the sort: ids share long prefixes ("imp-20240101-..."), which makes a
    # sort on the id itself compare whole strings; a 64-bit key sorts on its prefix alone.
    # Valid records come first (false < true), so their numbers are 1, 2, ...
    order = Window.partitionBy("_bucket", IMPRESSION_ID).orderBy(
        F.col("reason").isNotNull(), *payload
    )
    return (
        tagged.repartition(partitions, IMPRESSION_ID)
        .withColumn("_n", F.row_number().over(order))
        .withColumn("copy", F.when(F.col("reason").isNull(), F.col("_n")))
        .drop("_n", "_bucket")
    )


def deduplicate_impressions(ranked: DataFrame) -> DataFrame:
    """The copy of each valid impression id that the table keeps, from
    :func:`rank_impressions`: ``impression_id`` and the payload columns."""
    return ranked.where(F.col("copy") == 1).drop(*READ_COLUMNS, "reason", "copy")


def valid_ids(impressions: DataFrame) -> DataFrame:
    """``folder_dt`` and ``impression_id`` of the valid records of parsed impressions (the
    output of :func:`features.raw.read_log`): the look-back rows of :func:`impression_lookup`.
    A published table's ``dt`` and ``impression_id`` columns are the same rows, deduplicated."""
    return impressions.where(~F.col("malformed") & ~_missing_key("impressions")).select(
        "folder_dt", IMPRESSION_ID
    )


def impression_lookup(
    today: DataFrame, day: str, lookback: DataFrame | None, clicks: DataFrame
) -> DataFrame:
    """Day and time of the impressions that some click points to.

    Args:
        today: day ``day``'s valid impressions (``impression_id``, ``ts``; repeats allowed).
        day: the build's day, ``YYYY-MM-DD``.
        lookback: the valid impression ids of the look-back days (``folder_dt``,
            ``impression_id``; repeats allowed, see :func:`valid_ids`) or None.
        clicks: parsed click records (``impression_id``).

    Returns:
        ``impression_id``, ``imp_days`` (the days it was seen on, sorted: an id may repeat
        across days) and ``imp_ts`` (its earliest time on ``day``; null when not seen on
        ``day``), one row per id that a click names. Clicks are few, impressions many: the
        impression side is cut down to those ids with a broadcast semi-join before anything
        is shuffled.
    """
    referenced = _referenced(clicks)
    seen = today.select(IMPRESSION_ID, F.lit(day).alias("imp_day"), F.col("ts").alias("_ts"))
    if lookback is not None:
        earlier = lookback.select(
            IMPRESSION_ID,
            F.col("folder_dt").alias("imp_day"),
            F.lit(None).cast("long").alias("_ts"),
        )
        seen = seen.unionByName(earlier)
    return (
        seen.join(referenced, IMPRESSION_ID, "left_semi")
        .groupBy(IMPRESSION_ID)
        .agg(
            F.array_sort(F.collect_set("imp_day")).alias("imp_days"),
            F.min("_ts").alias("imp_ts"),
        )
    )


def _parent_day(horizon: int) -> Column:
    """A click's impression day: the earliest day in ``folder_dt - horizon .. folder_dt`` that
    its impression id was seen on, or null. Bounded by the click's own folder, not by what the
    build reads, so every build that reads the folder names the same day, even for an id
    repeated across days."""
    low, high = _day_offset("folder_dt", -horizon), F.col("folder_dt")
    in_reach = F.filter(F.col("imp_days"), lambda d: (d >= low) & (d <= high))
    return F.element_at(in_reach, 1)


def _owner(parent_day: str, horizon: int) -> Column:
    """The day whose build owns a record (see the module docstring)."""
    in_reach = (
        F.col(parent_day).isNotNull()
        & (F.col(parent_day) >= _day_offset("folder_dt", -horizon))
        & (F.col(parent_day) <= F.col("folder_dt"))
    )
    return F.when(in_reach, F.col(parent_day)).otherwise(F.col("folder_dt"))


def _first_per(key: str, among: str, order: list[str]) -> Column:
    """Rank of a row among the rows with the same ``key`` where the flag ``among`` holds."""
    return F.row_number().over(Window.partitionBy(among, key).orderBy(*order))


def _event_status(nth: str) -> Column:
    """The accounting status of a click or conversion record: null when another day's build
    owns it, DEDUPLICATED for a repeated event id or a later event on the same impression
    (``nth`` > 1), QUARANTINED when it has a reason, OUTPUT otherwise."""
    return (
        F.when(~F.col("owned"), F.lit(None))
        .when(F.col("reason") == Reason.DUPLICATE_EVENT, DEDUPLICATED)
        .when(F.col("reason").isNotNull(), QUARANTINED)
        .when(F.col(nth) > 1, DEDUPLICATED)
        .otherwise(OUTPUT)
    )


def attribute_clicks(
    clicks: DataFrame,
    lookup: DataFrame,
    day: str,
    horizon: int,
    click_window_s: int,
) -> DataFrame:
    """Give every click record its owner, status and reason for the build of ``day``.

    Args:
        clicks: parsed click records of folders ``day - horizon .. day + horizon``.
        lookup: output of :func:`impression_lookup` for these clicks.
        day: the build's day.
        horizon: look-ahead / look-back in days (``AttributionConfig.horizon_days``).
        click_window_s: a click counts only this many seconds after its impression.

    Returns:
        The click records with ``imp_day``, ``owned`` (this build counts the record),
        ``status`` and ``reason`` (null for not-owned records), ``attributed`` (a click in
        the window: the first per impression is ``output``, the others
        ``deduplicated`` as ``repeat_click_on_impression``; conversions may use any of them).
    """
    invalid = F.col("malformed") | _missing_key("clicks")
    joined = (
        clicks.join(F.broadcast(lookup), IMPRESSION_ID, "left")
        .withColumn("_invalid", invalid)
        .withColumn("imp_day", _parent_day(horizon))
    )
    joined = joined.withColumn(
        "owned",
        F.when(F.col("_invalid"), F.col("folder_dt") == day).otherwise(
            _owner("imp_day", horizon) == day
        ),
    )
    joined = joined.withColumn("_owned_valid", F.col("owned") & ~F.col("_invalid"))
    # Copies of one click id that agree on every field are interchangeable: which one is
    # kept does not change the output.
    rank = F.when(
        F.col("_owned_valid"),
        _first_per("click_id", "_owned_valid", ["ts", "folder_dt", IMPRESSION_ID]),
    )
    joined = joined.withColumn("_copy", rank)
    delay = F.col("ts") - F.col("imp_ts")
    via_impression = F.col("imp_day") == day
    reason = (
        F.when(~F.col("owned"), F.lit(None))
        .when(F.col("malformed"), Reason.MALFORMED)
        .when(F.col("_invalid"), Reason.MISSING_KEY)
        .when(F.col("_copy") > 1, Reason.DUPLICATE_EVENT)
        .when(
            ~F.coalesce(via_impression, F.lit(False)) | F.col("imp_ts").isNull(),
            Reason.UNKNOWN_IMPRESSION,
        )
        .when(delay < 0, Reason.CLICK_BEFORE_IMPRESSION)
        .when(delay > click_window_s, Reason.OUTSIDE_WINDOW)
    )
    joined = joined.withColumn("reason", reason).withColumn(
        "attributed", F.col("owned") & F.col("reason").isNull()
    )
    repeat = F.when(
        F.col("attributed"), _first_per(IMPRESSION_ID, "attributed", ["ts", "click_id"])
    )
    joined = joined.withColumn("_nth_click", repeat)
    status = _event_status("_nth_click")
    return joined.select(
        "folder_dt",
        "raw",
        "click_id",
        IMPRESSION_ID,
        "ts",
        "imp_day",
        "owned",
        status.alias("status"),
        F.when(F.col("_nth_click") > 1, Reason.REPEAT_CLICK)
        .otherwise(F.col("reason"))
        .alias("reason"),
        F.coalesce(F.col("attributed"), F.lit(False)).alias("attributed"),
        "malformed",
    )


def attribute_conversions(
    conversions: DataFrame,
    clicks: DataFrame,
    day: str,
    horizon: int,
    conversion_window_s: int,
) -> DataFrame:
    """Give every conversion record its owner, status and reason for the build of ``day``.

    A conversion's parent day is the impression day of its click, taken from the click
    records that are themselves owned through their impression; its click must be
    ``attributed`` by this build for the conversion to count.

    Args:
        conversions: parsed conversion records of folders ``day .. day + horizon``.
        clicks: the output of :func:`attribute_clicks` (all click records this build read).
        day: the build's day.
        horizon: as in :func:`attribute_clicks`.
        conversion_window_s: a conversion counts only this long after its click.

    Returns:
        The conversion records with ``owned``, ``status``, ``reason`` and the
        ``impression_id`` of their attributed click (null when there is none).
    """
    valid_clicks = clicks.where(~F.col("malformed") & F.col("click_id").isNotNull())
    through_impression = F.col("imp_day").isNotNull() & (
        _owner("imp_day", horizon) == F.col("imp_day")
    )
    # One row per click id: its impression day, and the click this build attributed (at most
    # one record per id is: repeats are deduplicated first).
    click_info = valid_clicks.groupBy("click_id").agg(
        F.min(F.when(through_impression, F.col("imp_day"))).alias("click_day"),
        F.lit(True).alias("_known"),
        F.max(F.when(F.col("attributed"), F.col(IMPRESSION_ID))).alias("_impression"),
        F.max(F.when(F.col("attributed"), F.col("ts"))).alias("click_ts"),
    )
    invalid = F.col("malformed") | _missing_key("conversions")
    joined = conversions.join(F.broadcast(click_info), "click_id", "left").withColumn(
        "_invalid", invalid
    )
    joined = joined.withColumn(
        "owned",
        F.when(F.col("_invalid"), F.col("folder_dt") == day).otherwise(
            _owner("click_day", horizon) == day
        ),
    )
    joined = joined.withColumn("_owned_valid", F.col("owned") & ~F.col("_invalid"))
    rank = _first_per("conversion_id", "_owned_valid", ["ts", "folder_dt", "click_id"])
    joined = joined.withColumn("_copy", F.when(F.col("_owned_valid"), rank))
    via_click = F.coalesce(F.col("click_day") == day, F.lit(False))
    delay = F.col("ts") - F.col("click_ts")
    reason = (
        F.when(~F.col("owned"), F.lit(None))
        .when(F.col("malformed"), Reason.MALFORMED)
        .when(F.col("_invalid"), Reason.MISSING_KEY)
        .when(F.col("_copy") > 1, Reason.DUPLICATE_EVENT)
        .when(~via_click & F.col("_known").isNull(), Reason.UNKNOWN_CLICK)
        .when(F.col("click_ts").isNull(), Reason.CLICK_NOT_ATTRIBUTED)
        .when(delay < 0, Reason.CONVERSION_BEFORE_CLICK)
        .when(delay > conversion_window_s, Reason.OUTSIDE_WINDOW)
    )
    joined = joined.withColumn("reason", reason).withColumn(
        "_attributed", F.col("owned") & F.col("reason").isNull()
    )
    joined = joined.withColumn(
        "_nth",
        F.when(
            F.col("_attributed"), _first_per("_impression", "_attributed", ["ts", "conversion_id"])
        ),
    )
    status = _event_status("_nth")
    return joined.select(
        "folder_dt",
        "raw",
        "conversion_id",
        "click_id",
        "ts",
        F.when(F.col("_attributed"), F.col("_impression")).alias(IMPRESSION_ID),
        "owned",
        status.alias("status"),
        F.when(F.col("_nth") > 1, Reason.REPEAT_CONVERSION)
        .otherwise(F.col("reason"))
        .alias("reason"),
    )


def label_impressions(
    impressions: DataFrame, clicks: DataFrame, conversions: DataFrame
) -> DataFrame:
    """Add the ``click`` and ``conversion`` labels (int 0/1) to the day's valid impressions.

    ``click`` is 1 when an ``output`` click points to the impression (at most one does);
    ``conversion`` when an ``output`` conversion does, and never without a click. The labels
    (one row per clicked impression) are broadcast, so ``impressions`` keeps its layout.
    """
    clicked = clicks.where(F.col("status") == OUTPUT).select(IMPRESSION_ID)
    converted = conversions.where(F.col("status") == OUTPUT).select(
        IMPRESSION_ID, F.lit(1).alias("_v")
    )
    labels = clicked.join(converted, IMPRESSION_ID, "left").select(
        IMPRESSION_ID, F.lit(1).alias("_c"), F.coalesce(F.col("_v"), F.lit(0)).alias("_v")
    )
    labelled = impressions.join(F.broadcast(labels), IMPRESSION_ID, "left")
    return (
        labelled.withColumn(CLICK, F.coalesce(F.col("_c"), F.lit(0)).cast("int"))
        .withColumn(CONVERSION, F.coalesce(F.col("_v"), F.lit(0)).cast("int"))
        .drop("_c", "_v")
    )


def hash_id(value: Column, field: str, num_buckets: int) -> Column:
    """A raw value → an id in ``1 .. num_buckets - 1``; null → 0 (missing).

    ``1 + pmod(xxhash64(field, string(value)), num_buckets - 1)``: hashing needs no vocabulary
    to build, ship or version, gives the same id on every day and on the training and
    serving sides, and maps never-seen values without a refit; ``num_buckets`` bounds the
    collisions. The field name is hashed in so that equal raw values of two fields differ.
    """
    hashed = F.lit(1) + F.pmod(
        F.xxhash64(F.lit(field), value.cast("string")), F.lit(num_buckets - 1)
    )
    return F.when(value.isNull(), F.lit(0).cast("long")).otherwise(hashed.cast("long"))


def hash_bag(values: Column, field: str, num_buckets: int, max_len: int) -> Column:
    """A bag of raw values → exactly ``max_len`` ids: hashed, truncated, padded with 0.

    A null bag gives ``max_len`` zeros; a null element gives id 0.
    """
    ids = F.transform(F.slice(values, 1, max_len), lambda v: hash_id(v, field, num_buckets))
    ids = F.coalesce(ids, F.array().cast("array<bigint>"))
    padding = F.array_repeat(F.lit(0).cast("long"), F.lit(max_len) - F.size(ids))
    return F.concat(ids, padding)


def missing_ids(spec: FieldSpec) -> Column:
    """The value of a field with no raw value: id 0, or a bag of ``max_len`` zeros."""
    if spec.kind == "multi":
        return F.array_repeat(F.lit(0).cast("long"), spec.max_len or 1)
    return F.lit(0).cast("long")


def _encode(spec: FieldSpec, value: Column) -> Column:
    if spec.kind == "multi":
        return hash_bag(value, spec.name, spec.num_buckets, spec.max_len or 1)
    return hash_id(value, spec.name, spec.num_buckets)


def _source(spec: FieldSpec) -> tuple[str, str]:
    log, _, column = spec.source.partition(".")
    return log, column


def hash_profile(profile: DataFrame, log: str, key: str, fields: FieldsConfig) -> DataFrame:
    """A profile snapshot → one row per key with the hashed ids of its fields.

    Returns:
        ``_key_<log>`` (the raw key) and one column per field sourced from ``log``. Repeated
        keys keep the smallest row of ids (a deterministic choice).
    """
    specs = [s for s in fields.fields if _source(s)[0] == log]
    hashed = profile.select(
        F.col(key).alias(f"_key_{log}"),
        *[_encode(s, F.col(_source(s)[1])).alias(s.name) for s in specs],
    )
    if not specs:
        return hashed.distinct()
    return (
        hashed.where(F.col(f"_key_{log}").isNotNull())
        .groupBy(f"_key_{log}")
        .agg(F.min(F.struct(*[s.name for s in specs])).alias("_ids"))
        .select(f"_key_{log}", "_ids.*")
    )


def encode_features(
    impressions: DataFrame,
    profiles: dict[str, tuple[DataFrame, str]],
    fields: FieldsConfig,
) -> DataFrame:
    """Labelled impressions → the feature table (the schema of :mod:`contract.schema`).

    Args:
        impressions: valid, labelled impressions (raw impression columns, ``click``,
            ``conversion``).
        profiles: ``{log: (hashed profile from hash_profile, impression column to join on)}``.
        fields: the field list.

    Returns:
        ``impression_id``, ``click``, ``conversion`` and one id column per field, in order.
        A user or item absent from its snapshot gets id 0 in all of that profile's fields.
    """
    own = [s for s in fields.fields if _source(s)[0] == "impressions"]
    table = impressions.select(
        IMPRESSION_ID,
        CLICK,
        CONVERSION,
        *[F.col(profile_key).alias(f"_join_{log}") for log, (_, profile_key) in profiles.items()],
        *[_encode(s, F.col(_source(s)[1])).alias(s.name) for s in own],
    )
    for log, (hashed, _) in profiles.items():
        table = table.join(hashed, F.col(f"_join_{log}") == F.col(f"_key_{log}"), "left")
    columns = [F.coalesce(F.col(s.name), missing_ids(s)).alias(s.name) for s in fields.fields]
    return table.select(IMPRESSION_ID, CLICK, CONVERSION, *columns)


def days_around(day: str, before: int, after: int) -> list[str]:
    """``day - before .. day + after`` as ``YYYY-MM-DD`` strings."""
    start = dt.date.fromisoformat(day)
    return [(start + dt.timedelta(days=o)).isoformat() for o in range(-before, after + 1)]
