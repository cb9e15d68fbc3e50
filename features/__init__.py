"""PySpark library code of the pipeline: schemas, parsing, joins, transforms, quality checks.

`jobs/*.py` are thin spark-submit entry points over this package.
"""
