"""ESMM: the torch side of the pipeline (config, schema, model, Petastorm input, Horovod training).

Importing the package itself is cheap (no torch): the Spark side imports `esmm.config` and
`esmm.schema` on executors, where torch may not be installed.
"""

__version__ = "0.1.0"
