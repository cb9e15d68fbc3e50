"""ESMM: the torch side of the pipeline (model, losses, metrics, Petastorm input, Horovod
training, MLflow tracking, the promotion gate and the served pyfunc).

It reads only what :mod:`contract` defines (the field list, the table's schema and layout) and
imports nothing from the Spark side (``features/``). Importing the package itself is cheap:
torch is imported by its modules, not here.
"""

__version__ = "0.1.0"
