"""Where a comparison's trials run: Ray Tune, on this machine or on a cluster.

The project says what a trial is (:func:`daft_mm.benchmark.runs.run_trial`) and which trials a
search needs next (generators of :class:`~daft_mm.benchmark.runs.Job` batches, see
:mod:`daft_mm.benchmark.selection`); Ray Tune decides where and when they run, sizes them
(``cpus_per_trial`` / ``gpus_per_trial``), retries a trial whose worker died, and scales from one
core to a Slurm cluster. :class:`TrialPlan` is the bridge, a Tune ``Searcher``: it hands Tune
each generator's next trials as they become known, so independent searches (FT's and DAFT's)
share the slots, and a search moves on as soon as its own batch is done.

Successive halving is decided in :func:`~daft_mm.benchmark.selection.search_steps`, not by Tune's
``ASHAScheduler``: ASHA's cut-offs depend on which trial reports first, so the same comparison
could choose differently on 2 cores and on 8 GPUs; the rule there depends on the scores only.

A local Ray (the default) binds to the loopback address, with no dashboard and no usage
reporting: nothing leaves the machine.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from .methods import Point
from .runs import Context, Job, cached_result, save_eval_sets
from .task import InputError

__all__ = ['Resources', 'RayCluster', 'TrialPlan', 'run_trials', 'run_jobs', 'job_to_dict',
           'job_from_dict']

#: A source of trials: yields a batch of jobs, is sent their results (dicts, in order), returns
#: whatever it computed.
Source = Generator[List[Job], List[Dict[str, Any]], Any]

#: Set before Ray is imported: no usage reporting, Tune's plain output (its rich tables would
#: flood a log), and Ctrl-C as a KeyboardInterrupt (Tune's own handler waits for trials to end).
_QUIET = {'RAY_USAGE_STATS_ENABLED': '0', 'RAY_AIR_NEW_OUTPUT': '0',
          'TUNE_DISABLE_SIGINT_HANDLER': '1', 'RAY_DEDUP_LOGS': '0'}


@dataclass(frozen=True)
class Resources:
    """What one trial asks of a node (``gpus=None``: one GPU where the cluster has GPUs)."""

    cpus: float = 1.0
    gpus: Optional[float] = 0.0

    def text(self) -> str:
        return f'{self.cpus:g} CPU' + (f' and {self.gpus:g} GPU' if self.gpus else '')


def job_to_dict(job: Job) -> Dict[str, Any]:
    d = asdict(job)
    d['point'] = job.point.to_dict()
    d['probe'] = None if job.probe is None else job.probe.to_dict()
    return d


def job_from_dict(d: Dict[str, Any]) -> Job:
    return Job(**dict(d, point=Point.from_dict(d['point']),
                      probe=None if d.get('probe') is None else Point.from_dict(d['probe'])))


def _is_loopback(host: str) -> bool:
    try:
        return host in ('localhost', '') or socket.gethostbyname(host).startswith('127.')
    except OSError:
        return False


class RayCluster:
    """Ray for one comparison: a local Ray started here (and stopped at the end), or a running
    cluster joined at ``address`` (left running). Checks at start-up, so a mistake is an error
    in seconds, not a hang: the address answers, and some node can place a trial."""

    def __init__(self, address: Optional[str] = None, resources: Resources = Resources(),
                 verbose: bool = False) -> None:
        self.address, self.resources, self.verbose = address, resources, verbose
        self.started = False
        self.slots = 1
        self.where = ''

    def __enter__(self) -> 'RayCluster':
        os.environ.update(_QUIET)
        host = None
        if self.address is not None:
            host, port = self.check_reachable(self.address)
        local = host is None or _is_loopback(host)
        if local:
            # Ray would advertise this machine's network address; a local Ray stays on loopback
            os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'
        import ray
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = not local  # read at call time, also after import
        if ray.is_initialized():
            ray.shutdown()
        kwargs: Dict[str, Any] = dict(log_to_driver=self.verbose, logging_level='ERROR',
                                      configure_logging=True)
        if self.address is None:
            import torch
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            # 'local': a new Ray of its own, never one a `ray start` left running here
            ray.init(address='local', num_cpus=os.cpu_count() or 1, num_gpus=gpus,
                     include_dashboard=False, object_store_memory=256 * 2**20, **kwargs)
            self.started = True
            self.where = f'a local Ray on 127.0.0.1 ({os.cpu_count()} CPUs, {gpus} GPUs)'
        else:
            ray.init(address=f'{host}:{port}', **kwargs)
            self.where = f'the Ray cluster at {self.address}'
        if self.resources.gpus is None:  # a GPU per trial wherever there are GPUs
            has_gpus = ray.cluster_resources().get('GPU', 0) > 0
            self.resources = replace(self.resources, gpus=1.0 if has_gpus else 0.0)
        try:
            self.slots = self._check_placeable()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray
        if ray.is_initialized():
            ray.shutdown()  # a local Ray stops with it; a cluster's own processes stay

    @staticmethod
    def parse_address(address: str) -> Tuple[str, int]:
        host, sep, port = address.rpartition(':')
        if not sep or not host or not port.isdigit():
            raise InputError(f'--address {address!r}: give HOST:PORT of a Ray head (the address '
                             '`ray start --head` prints, e.g. 10.0.0.5:6379)')
        return host, int(port)

    @classmethod
    def check_reachable(cls, address: str) -> Tuple[str, int]:
        """HOST and PORT of a Ray head that answers; an error in seconds otherwise (Ray itself
        would wait for a minute and more)."""
        host, port = cls.parse_address(address)
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except OSError as err:
            raise InputError(f'no Ray cluster answers at {address} ({err}): start one with `ray '
                             f'start --head --port {port}` on that machine (docs/compare.md), or '
                             'leave --address out for a local Ray') from None
        return host, port

    def _check_placeable(self) -> int:
        """How many trials fit side by side; an error when no node can place one."""
        import ray
        nodes = [n['Resources'] for n in ray.nodes() if n.get('Alive')]
        need = self.resources

        def fits(r: Dict[str, float]) -> int:
            n = int(r.get('CPU', 0) // need.cpus) if need.cpus else 10**6
            if need.gpus:
                n = min(n, int(r.get('GPU', 0) // need.gpus))
            return n
        slots = sum(fits(r) for r in nodes)
        if not slots:
            largest = max(nodes, key=lambda r: (r.get('GPU', 0), r.get('CPU', 0)), default={})
            raise InputError(
                f'a trial asks for {need.text()}, but no node of {self.where} has that much (the '
                f'largest has {largest.get("CPU", 0):g} CPU and {largest.get("GPU", 0):g} GPU): '
                'lower --cpus-per-trial / --gpus-per-trial, or add a larger node')
        return slots


def _trainable(config: Dict[str, Any], shared: Optional[Dict[str, Any]] = None) -> None:
    """One Tune trial: a job of the comparison in this worker. An error of the job's own (a bad
    config, a diverging loss) is reported as its result, not raised, so Tune retries only
    trials whose worker died."""
    from ray import tune

    from .runs import run_trial, worker_context
    job = job_from_dict(config['job'])
    t0 = time.time()
    try:
        ctx = worker_context(shared['task'], shared['task_key'], Path(shared['work_dir']),
                             shared['threads'], shared['verbose'])
        result = run_trial(ctx, job)
    except Exception as err:  # noqa: BLE001  (every error of a trial is its result)
        result = dict(error=f'{type(err).__name__}: {err}',
                      traceback=traceback.format_exc()[-4000:], seconds=time.time() - t0,
                      iterations=0, reused=False)
    value = result.get('id_val', math.nan)
    tune.report({'id_val': value if isinstance(value, float) else math.nan,
                 'payload': json.dumps(result, default=str)})


def _searcher_base():
    from ray.tune.search import Searcher
    return Searcher


class TrialPlan:
    """Feeds Tune the trials of several independent sources (generators of job batches); a
    source is sent its batch's results as soon as the batch is done. Jobs already cached are
    answered here, without a trial. Built by :func:`run_trials` (it subclasses Tune's
    ``Searcher`` at run time, so importing this module does not import Ray)."""

    def __init__(self, ctx: Context, sources: Dict[str, Source],
                 on_start: Callable[[Job], None], on_result: Callable[[Job, Dict[str, Any]], None]
                 ) -> None:
        self.ctx, self.sources = ctx, dict(sources)
        self.on_start, self.on_result = on_start, on_result
        self.returned: Dict[str, Any] = {}
        self.queue: List[Job] = []
        self.waiting: Dict[Job, List[Tuple[str, int]]] = {}  # job -> (source, index) waiting
        self.batches: Dict[str, Tuple[List[Job], List[Optional[Dict[str, Any]]]]] = {}
        self.running: Dict[str, Job] = {}
        for name in list(self.sources):
            self._advance(name, None)

    @property
    def finished(self) -> bool:
        return not self.sources

    def _advance(self, name: str, values: Optional[List[Dict[str, Any]]]) -> None:
        while True:
            try:
                gen = self.sources[name]
                batch = next(gen) if values is None else gen.send(values)
            except StopIteration as stop:
                self.returned[name] = stop.value
                del self.sources[name]
                return
            results: List[Optional[Dict[str, Any]]] = [None] * len(batch)
            self.batches[name] = (batch, results)
            for i, job in enumerate(batch):
                if job in self.waiting:  # asked for twice at once: runs once
                    self.waiting[job].append((name, i))
                    continue
                cached = cached_result(self.ctx, job)
                if cached is not None:
                    results[i] = cached
                    self.on_result(job, cached)
                else:
                    self.waiting[job] = [(name, i)]
                    self.queue.append(job)
            if any(r is None for r in results):
                return
            values = results  # all cached: on to its next batch

    def suggest(self, trial_id: str) -> Any:
        if self.queue:
            job = self.queue.pop(0)
            self.running[trial_id] = job
            self.on_start(job)
            return {'job': job_to_dict(job)}
        return _searcher_base().FINISHED if self.finished else None

    def on_trial_complete(self, trial_id: str, result: Optional[Dict[str, Any]] = None,
                          error: bool = False) -> None:
        job = self.running.pop(trial_id)
        if error or not result or 'payload' not in result:
            value = dict(error='its Ray worker died twice (the trial was retried once); see the '
                         'Ray logs', id_val=math.nan, iterations=0, reused=False, seconds=0.0)
        else:
            value = json.loads(result['payload'])
        self.complete(job, value)

    def complete(self, job: Job, value: Dict[str, Any]) -> None:
        self.on_result(job, value)
        for name, i in self.waiting.pop(job, []):
            batch, results = self.batches[name]
            results[i] = value
            if all(r is not None for r in results):
                self._advance(name, results)  # type: ignore[arg-type]


_PLAN: List[type] = []


def _plan_class() -> type:
    """:class:`TrialPlan` as a Tune ``Searcher`` (made once, when Ray is first needed). Tune
    pickles its searcher with the experiment; nothing of a plan is worth keeping (a rerun resumes
    from the run cache), and its generators cannot be pickled."""
    if not _PLAN:
        Searcher = _searcher_base()

        class Plan(TrialPlan, Searcher):
            def __init__(self, *args: Any) -> None:
                Searcher.__init__(self, metric='id_val', mode='max')
                TrialPlan.__init__(self, *args)

            def __getstate__(self) -> Dict[str, Any]:
                return {}

            def save(self, checkpoint_path: str) -> None:
                pass

            def restore(self, checkpoint_path: str) -> None:
                pass

        _PLAN.append(Plan)
    return _PLAN[0]


def run_trials(ctx: Context, sources: Dict[str, Source], *, cluster: RayCluster,
               concurrent: Optional[int] = None, threads: int = 1,
               on_start: Callable[[Job], None] = lambda job: None,
               on_result: Callable[[Job, Dict[str, Any]], None] = lambda job, r: None
               ) -> Dict[str, Any]:
    """Run every source to its end on ``cluster`` (at most ``concurrent`` trials at once; by
    default as many as it can place); returns what each source returned."""
    plan = _plan_class()(ctx, sources, on_start, on_result)
    if plan.finished:
        return plan.returned
    if ctx.full_sets:
        save_eval_sets(ctx)  # the workers load them instead of building them again
    from ray import tune
    shared = dict(task=ctx.task, task_key=ctx.task_key, work_dir=str(ctx.work_dir),
                  threads=threads, verbose=ctx.verbose)
    trainable = tune.with_resources(tune.with_parameters(_trainable, shared=shared),
                                    {'cpu': cluster.resources.cpus,
                                     'gpu': cluster.resources.gpus})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=plan, num_samples=-1, reuse_actors=True,
                                    max_concurrent_trials=concurrent or cluster.slots),
        run_config=tune.RunConfig(storage_path=str(ctx.work_dir / 'ray'), name='trials',
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=1)))
    tuner.fit()
    if not plan.finished:  # Tune ended early (it only does so on errors of its own)
        raise RuntimeError('Ray Tune stopped before every trial had run: see the Ray log above')
    return plan.returned


def run_jobs(ctx: Context, jobs: List[Job], *, cluster: RayCluster, **kwargs: Any
             ) -> List[Dict[str, Any]]:
    """Results of a flat list of independent jobs (LP-FT's probe stages are trained first, once
    per seed, for the LP-FT runs that will train); ``kwargs`` as for :func:`run_trials`."""
    probes = list(dict.fromkeys(Job('LP-FT', j.probe, j.seed, budget=j.budget, kind='probe')
                                for j in jobs if j.probe is not None and j.kind == 'run'
                                and cached_result(ctx, j) is None))

    def source():
        if probes:
            yield probes
        return (yield list(jobs))
    return run_trials(ctx, {'jobs': source()}, cluster=cluster, **kwargs)['jobs']
