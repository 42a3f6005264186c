"""`mpq sweep`: many proxy searches as one Ray Tune experiment, and the policy picked from them.

- :mod:`framework.tune.space`: `tune.space` in the config -> Ray Tune sampling domains -> the list
  of points to run;
- :mod:`framework.tune.plan`: one trial config per distinct point, each named by a hash of its
  search config (the trial's folder, and what makes identical trials run once);
- :mod:`framework.tune.trial`: the trainable, one `mpq search` that reports every epoch;
- :mod:`framework.tune.scheduler`: ASHA on the epochs, recording the trials it stops early;
- :mod:`framework.tune.cluster`: Ray in this process on 127.0.0.1, or a running cluster;
- :mod:`framework.tune.select`: the Pareto front and the best policy under the budget (pure);
- :mod:`framework.tune.plot`: the Pareto plot;
- :mod:`framework.tune.sweep`: `run_sweep(cfg) -> Result`, which ties them together.

Nothing here imports Ray at package import time: only a sweep pays for it.
"""
