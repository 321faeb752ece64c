"""The multilingual benchmark of metaopt: Sequential Reptile's four claims on real data, offline.

Run it with ``python benchmarks/multilingual/run.py`` (see README.md in this folder). Modules,
one concern each: ``data`` (the entity suite), ``encoder`` (all-MiniLM-L6-v2 in plain torch),
``forgetting`` (the frozen LID probe), ``cache`` (the on-disk cache), ``features`` (frozen-bottom
token states), ``config`` (settings and presets), ``methods`` (the compared optimizers),
``prepare`` (data and models per seed), ``train`` (one run through the metaopt loop),
``evaluate`` (accuracy, forgetting, gradient cosine), ``analysis`` (statistics and verdicts),
``report`` (JSON and Markdown), ``plots`` (PNG figures), ``system`` (time, memory, versions)
and ``run`` (the command line).
"""
