"""SparkSession construction shared by every job and by the tests."""

from __future__ import annotations

import os

from pyspark.sql import SparkSession


def get_spark(
    app_name: str,
    master: str | None = None,
    shuffle_partitions: int | None = None,
    log_level: str = "WARN",
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """Get (or create) the SparkSession for a job.

    Under ``spark-submit`` the master and resources come from spark-submit's own flags and
    ``spark-defaults.conf``; ``master`` only applies when no master is configured (a plain
    ``python jobs/x.py`` run or a test), where it defaults to ``local[*]``.

    Args:
        app_name: the application name shown by Spark / YARN / Kubernetes.
        master: master URL to use when none is configured, e.g. ``local[2]``.
        shuffle_partitions: ``spark.sql.shuffle.partitions`` when set; the default 200 is
            wasteful for local runs.
        log_level: Spark's log level for this application.
        conf: more Spark settings, e.g. ``{"spark.eventLog.enabled": "true"}``.

    Returns:
        The active SparkSession.
    """
    builder = SparkSession.builder.appName(app_name)
    # spark-submit's PythonRunner hands the driver a gateway through these variables; then the
    # master and resources are spark-submit's to decide, and a builder setting would override them.
    launched_by_spark_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    if master and not launched_by_spark_submit:
        builder = builder.config("spark.master", master)
    # UTC JVMs, without taking the JVM options a user gives (spark-submit's --conf
    # spark.{driver,executor}.extraJavaOptions, e.g. GC or heap-dump flags): the executors get
    # it from the TZ variable, and the driver's option is only set where this call launches
    # the driver's JVM (under spark-submit it is already running).
    builder = (
        builder.config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.executorEnv.TZ", "UTC")
    )
    if not launched_by_spark_submit:
        builder = builder.config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
    if shuffle_partitions is not None:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel(log_level)
    return session
