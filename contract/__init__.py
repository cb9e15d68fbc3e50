"""The contract between the Spark side (``features/``, ``jobs/``) and the torch side (``esmm/``).

Neither side imports the other; both import this package, which imports neither torch nor
pyspark (only pydantic and PyYAML, and pyarrow lazily where a schema or a file is read):

- :mod:`contract.config`: the strict YAML loader and ``--set`` overrides of every config;
- :mod:`contract.fields`: the field list (``conf/fields.yaml``) and its specs;
- :mod:`contract.schema`: the feature table's columns and Arrow schema, and its check;
- :mod:`contract.layout`: partition, stats and quarantine paths, and the stats reader;
- :mod:`contract.dates`: the one parser of days and partition lists.
"""
