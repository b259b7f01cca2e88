"""The Optuna side of a sweep: storage from a URL, sampler, pruner, the study every worker shares.

Storage: any SQLAlchemy URL goes to Optuna's RDBStorage (sqlite:///..., postgresql+psycopg://...,
mysql+pymysql://...) with a heartbeat: a worker records one every `heartbeat` seconds while its trial runs, and
any worker that finds a RUNNING trial silent for `grace` seconds fails it and re-queues its parameters
(RetryHeartbeatStaleTrialCallback), so a worker killed with `kill -9` costs one trial's time, not the study.
`journal:PATH` is Optuna's JournalStorage on a file (a shared file system without a database server); Optuna
has no heartbeat for it, so there a killed worker's trial stays RUNNING (see docs/sweeps.md).
"""
import os
import time
import warnings

import optuna
import sqlalchemy
from optuna.samplers import BaseSampler, RandomSampler, TPESampler

from vega_utils.common import VegaError

# fail_stale_trials and the heartbeat arguments are marked experimental by Optuna; the warnings say only that
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)   # not a line per study opened
TRIES = 5       # attempts to open a storage / create a study that other workers are creating at the same moment
RACE_ERRORS = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError)
MAX_RETRY = 3   # a trial whose worker died is re-queued at most this many times (a trial that kills its worker)


def default_storage(output_dir, name):
    return f"sqlite:///{os.path.join(output_dir, name, 'optuna.db')}"


def open_storage(url, heartbeat=60, grace=None):
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        path = url[len("journal:"):]
        if not path:
            raise VegaError("--storage journal:PATH needs a file path")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise VegaError(f"--storage {url!r} is neither a database URL (sqlite:///FILE, postgresql+psycopg://...) "
                        f"nor journal:PATH")
    kwargs = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        # several processes write one file: wait for its lock instead of failing at once
        kwargs = {"connect_args": {"timeout": 60}}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)   # was RetryFailedTrialCallback
    for attempt in range(TRIES):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace or 2 * heartbeat,
                heartbeat_stale_trial_callback=retry)
        except ImportError as e:
            raise VegaError(f"--storage {url.split(':', 1)[0]}: its database driver is not installed ({e})") from None
        except Exception as e:   # sqlalchemy's errors: a server that is not there, a bad password
            # Workers that start together on an empty database all create Optuna's tables; all but one
            # collide (PostgreSQL: a unique violation in its catalogue), and find the tables there next time.
            # (SQLite: "table already exists" or a locked file, an OperationalError)
            if attempt + 1 < TRIES and isinstance(e, RACE_ERRORS):
                time.sleep(0.5 + attempt)
                continue
            raise VegaError(f"cannot open storage {_hide_password(url)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0]}") from None


def _hide_password(url):
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':')[0]}:***@{tail}" if ":" in user else url


class TrialSeededSampler(BaseSampler):
    """TPE or random sampling whose random state is seeded by (seed, trial number) for every trial.

    Workers that share a study with the same --seed would otherwise draw the same start-up parameters, one
    for one; trial numbers are unique within a study, so here every trial draws its own, and a one-worker
    sweep is reproducible from --seed. (TPE keeps no other state: it reads the history from the storage.)"""

    def __init__(self, kind, seed):
        self.kind, self.seed = kind, seed
        self._inner = self._make(0)

    def _make(self, number):
        seed = (self.seed * 1_000_003 + number) % 2**32
        return TPESampler(seed=seed) if self.kind == "tpe" else RandomSampler(seed=seed)

    def before_trial(self, study, trial):
        self._inner = self._make(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._inner.after_trial(study, trial, state, values)


def make_pruner(kind, epochs):
    if kind == "median":
        # a trial is judged once 4 trials have finished, and only after its first fifth of the epochs
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 5))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 10), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(name, storage, sampler="tpe", pruner="median", seed=0, epochs=1):
    """Create the study or join it where it stands (load_if_exists). Two workers starting at the same moment
    on a new SQLite file can both try to create its tables: the loser tries again."""
    for attempt in range(TRIES):
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                       sampler=TrialSeededSampler(sampler, seed), pruner=make_pruner(pruner, epochs),
                                       load_if_exists=True)
        except sqlalchemy.exc.SQLAlchemyError:   # OperationalError / IntegrityError of the race above
            if attempt + 1 == TRIES:
                raise
            time.sleep(0.5 + attempt)


def load_study(name, storage):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise VegaError(f"no study named {name!r} in this storage") from None
