"""Filesystem side of the feature job: existence checks and atomic partition publishing.

Everything goes through Hadoop's FileSystem API (via the session's JVM) so the same code works
on a local disk, HDFS or an object store connector.

A partition is published by writing it completely under ``<out>/_tmp/<run>/`` and then
renaming it into place (:func:`publish_partition`, the paths of :mod:`contract.layout`): a
reader never sees a half-written ``dt=P`` (paths starting with ``_`` are ignored by Spark,
pyarrow and Petastorm), and a failed run leaves the previous ``dt=P`` untouched. The whole
stage → check → publish sequence of the jobs is :func:`features.publish.stage_and_publish`.
"""

from __future__ import annotations

from pyspark.sql import SparkSession

from contract.layout import PartitionPaths, partition_paths

__all__ = ["delete", "exists", "publish", "publish_partition", "write_text"]


def _fs_and_path(spark: SparkSession, path: str):
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return fs, hadoop_path


def exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists."""
    fs, hadoop_path = _fs_and_path(spark, path)
    return bool(fs.exists(hadoop_path))


def delete(spark: SparkSession, path: str) -> None:
    """Delete ``path`` recursively if it exists."""
    fs, hadoop_path = _fs_and_path(spark, path)
    if fs.exists(hadoop_path):
        fs.delete(hadoop_path, True)


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``path``, replacing it."""
    fs, hadoop_path = _fs_and_path(spark, path)
    stream = fs.create(hadoop_path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def publish(spark: SparkSession, staged: str, final: str, trash: str) -> None:
    """Move the complete ``staged`` file or directory to ``final``, replacing what was there.

    The previous ``final`` is first moved aside to ``trash`` (inside the run's temp folder) and
    deleted only after the new one is in place, so at no moment does ``final`` hold a mix of
    old and new files.
    """
    fs, staged_path = _fs_and_path(spark, staged)
    _, final_path = _fs_and_path(spark, final)
    _, trash_path = _fs_and_path(spark, trash)
    fs.mkdirs(final_path.getParent())
    if fs.exists(final_path) and not fs.rename(final_path, trash_path):
        raise OSError(f"could not move the previous {final} aside")
    if not fs.rename(staged_path, final_path):
        raise OSError(f"could not rename {staged} to {final}")
    fs.delete(trash_path, True)


def publish_partition(spark: SparkSession, run: str, out: str, partition: str) -> PartitionPaths:
    """Publish a run's staged ``quarantine``, ``stats.json`` and ``table`` as ``dt=partition``.

    The run folder must hold the three, complete. The table goes last: a ``dt=P`` folder only
    appears once its stats and quarantine exist. The run folder is removed afterwards.
    """
    paths = partition_paths(out, partition)
    publish(spark, f"{run}/quarantine", paths.quarantine, f"{run}/old-quarantine")
    publish(spark, f"{run}/stats.json", paths.stats, f"{run}/old-stats.json")
    publish(spark, f"{run}/table", paths.table, f"{run}/old-table")
    delete(spark, run)
    return paths
