"""`hydra/sweeper=lsc_random`: Hydra's basic sweeper plus random draws from intervals, the protocol of a log-uniform
sweep of the size weight gamma:

    lsc-train -m hydra/sweeper=lsc_random hydra.sweeper.n_trials=8 'compression.gamma=tag(log, interval(0.01, 1.0))'
    lsc-train -m hydra/sweeper=gamma_loguniform seed=0,1,2      # conf/hydra/sweeper/gamma_loguniform.yaml

`interval(low, high)` is drawn uniformly and `tag(log, interval(low, high))` log-uniformly (the Optuna sweeper's
syntax, so a config moves between the two unchanged), `n_trials` times from a generator seeded with `seed`: the same
command draws the same values. All interval parameters are drawn together per trial (a random search, not a grid of
draws), and the trials are crossed with the ordinary sweeps (`seed=0,1,2`, `a=1,2`) as the basic sweeper crosses
those, so that every draw is run with every seed. Values are rounded to 4 significant digits (kept inside the
interval) so that run folders and labels stay readable. Batches (`max_batch_size`) and launchers (local, SLURM)
work as with the basic sweeper.

Lives in the `hydra_plugins` namespace package because Hydra instantiates sweepers only from there; it imports
nothing heavy, since Hydra imports every plugin module at each start, and no `from __future__ import annotations`:
Hydra's plugin scan runs modules outside sys.modules, where dataclasses cannot resolve string annotations.
"""

import itertools
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.errors import HydraException

__all__ = ["RandomSweeper", "RandomSweeperConf", "draw"]


@dataclass
class RandomSweeperConf:
    _target_: str = "hydra_plugins.lsc_sweeper.random_sweeper.RandomSweeper"
    n_trials: int = 8  # draws of the interval parameters; each is crossed with the discrete sweeps
    seed: int = 0  # of the draws (not the training seed): the same seed draws the same values
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None  # key: sweep, as on the command line; the command line wins


ConfigStore.instance().store(
    group="hydra/sweeper", name="lsc_random", node=RandomSweeperConf, provider="lightning_selfcompress"
)


def draw(interval: IntervalSweep, rng: random.Random) -> float:
    """One value from `interval`, log-uniform when tagged `log`, rounded to 4 significant digits inside it."""
    low, high = float(interval.start), float(interval.end)
    if not low < high:
        raise HydraException(f"interval({interval.start}, {interval.end}): the low end must be below the high end.")
    if "log" in interval.tags:
        if low <= 0:
            raise HydraException(f"tag(log, interval({interval.start}, {interval.end})): a log interval must be > 0.")
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return min(max(float(f"{value:.4g}"), low), high)


class RandomSweeper(BasicSweeper):
    """Hydra's BasicSweeper, which expands the sweeps into batches of jobs and launches them, with interval sweeps
    (which it refuses) turned into `n_trials` random draws."""

    def __init__(
        self, n_trials: int, seed: int, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if n_trials < 1:
            raise HydraException(f"hydra.sweeper.n_trials={n_trials}: give at least 1 trial.")
        self.n_trials = n_trials
        self.seed = seed

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The jobs' overrides in batches: the product of the discrete sweeps and the trials. BasicSweeper.sweep
        calls this on the instance, so this replaces its static method of the same name."""
        dims: Dict[str, List[List[str]]] = {}  # per key, in order, its alternatives (each a list of key=value)
        intervals: Dict[str, IntervalSweep] = {}
        for override in overrides:  # a later override of a key (the command line) replaces an earlier (params)
            key = override.get_key_element()
            dims.pop(key, None)
            intervals.pop(key, None)
            if isinstance(override.value(), IntervalSweep):
                intervals[key] = override.value()
            elif override.is_sweep_override():
                if not override.is_discrete_sweep():
                    raise HydraException(f"{type(self).__name__} cannot sweep {override.input_line}.")
                dims[key] = [[f"{key}={v}"] for v in override.sweep_string_iterator()]
            else:
                dims[key] = [[f"{key}={override.get_value_element_as_str()}"]]
        alternatives = list(dims.values())
        if intervals:  # the trials vary slowest: a trial's seeds get neighbouring job numbers
            rng = random.Random(self.seed)
            trials = [[f"{k}={draw(s, rng)!r}" for k, s in intervals.items()] for _ in range(self.n_trials)]
            alternatives.insert(0, trials)
        jobs = [list(itertools.chain.from_iterable(combo)) for combo in itertools.product(*alternatives)]
        if max_batch_size is None:
            return [jobs]
        return list(self.split_overrides_to_chunks(jobs, max_batch_size))
