"""``qcourse autograde --cluster ADDRESS``: grade a class on the workers of a Dask scheduler.

Each submission becomes one Dask task, ``cluster_worker.grade_submission``: the same
``grade_one`` as local grading, sandbox and all, on a worker, which returns the outcome and the
files it produced (autograded notebook, feedback) as data. This process alone writes them: the
gradebook, the states, the feedback, one outcome at a time (``autograde.keep``), as results arrive.

Faults:

- A worker that dies mid-submission: the scheduler hands that task to another worker (Dask's
  ``distributed.scheduler.allowed-failures``, 3 by default). A task has one result however often
  it ran, and an outcome is kept once per student and notebook sha256, so a regraded submission
  is recorded exactly once. One whose workers died more often than allowed is not recorded: it
  is reported, and a re-run grades it again.
- A scheduler that goes away ends the run with ``ClusterError``; what was graded until then is
  recorded, and a re-run grades only what is missing (the sha256 states of local grading).
- Workers that cannot grade (other code, no model cache, weaker sandbox: ``cluster_worker``)
  never receive a task; when no worker can grade for ``wait_for_workers`` seconds the run stops
  and says what each worker lacks.

Example (a refused address):
    >>> connect("tcp://127.0.0.1:1", timeout=0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qcourse.cluster.ClusterError: cannot reach the Dask scheduler at tcp://127.0.0.1:1 ...
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from qcourse.autograde import Outcome, keep, prepare_assignment
from qcourse.cluster_worker import GraderCheck, check_report, course_bundle, facts, grade_submission, pass_bundle

INSTALL_HINT = "pip install 'qcourse[cluster]' (dask's distributed scheduler)"
POLL_SECONDS = 2.0


class ClusterError(RuntimeError):
    """The cluster cannot be used or went away: the message says why and what was kept."""


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"--cluster needs Dask's distributed, which is not installed: {INSTALL_HINT}") from None
    return distributed


def connect(address: str, timeout: float = 20.0):
    """A Dask ``Client`` on the scheduler at ``address`` (``tcp://host:port``, ``host:port``, or a
    scheduler file written by ``dask scheduler --scheduler-file``); ``ClusterError`` when it cannot."""
    distributed = _distributed()
    kwargs = {"timeout": timeout, "set_as_default": False}
    if Path(address).is_file():
        try:
            json.loads(Path(address).read_text())["address"]
        except (ValueError, KeyError, TypeError):
            raise ClusterError(f"{address} is not a Dask scheduler file (JSON with an 'address')") from None
        kwargs["scheduler_file"] = address
    else:
        kwargs["address"] = address
    try:
        return distributed.Client(**kwargs)
    except (OSError, TimeoutError, ValueError) as e:  # refused, unreachable, timed out, malformed
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                           f"({type(e).__name__}: {str(e)[:300]}); start one with `dask scheduler` and "
                           "workers with `dask worker ADDRESS`, see docs/cluster-grading.md") from None


def _graders(client, resource: str) -> list[str]:
    """The workers that passed the check (they hold the grading resource)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if w.get("resources", {}).get(resource))


def _unfit(client, resource: str) -> dict[str, list[str]]:
    """``{worker: what it lacks}`` for the workers that failed the check."""
    try:
        reports = client.run(check_report, resource, on_error="return")
    except Exception:  # a worker leaving mid-call: its report does not matter any more
        return {}
    return {w: r for w, r in reports.items() if isinstance(r, list) and r}


def _say_unfit(unfit: dict[str, list[str]], said: set, log) -> None:
    for worker, problems in unfit.items():
        if worker not in said:
            said.add(worker)
            log(f"  worker {worker} cannot grade and gets no submission: {'; '.join(problems)}")


def _lost_outcome(student: str, sha256: str, error: BaseException) -> Outcome:
    return Outcome(student, "error", sha256=sha256, worker="lost",
                   message=f"not graded: {type(error).__name__}: {str(error)[:300]} (not recorded; "
                           "the next run grades it again)")


def grade_on_cluster(address: str, todo: dict[str, Path], lab: str, course_root: Path,
                     timeout: float | None = None, log=print, wait_for_workers: float = 120.0,
                     connect_timeout: float = 20.0) -> dict[str, Outcome]:
    """Grade ``todo`` (``{student: notebook in course/submitted}``) on the cluster at ``address``;
    returns the outcomes by student, each kept (``autograde.keep``) as soon as it arrives."""
    distributed = _distributed()
    from tqdm.auto import tqdm

    client = connect(address, connect_timeout)
    outcomes: dict[str, Outcome] = {}
    try:
        expected = facts()
        resource = "qcourse_grader_" + hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]
        client.register_plugin(GraderCheck(expected, resource))
        bundle = course_bundle(course_root, lab)
        bundle_key = f"qcourse-course-{lab}-{hashlib.sha256(bundle).hexdigest()[:16]}"
        bundle_task = client.submit(pass_bundle, bundle, key=bundle_key, resources={resource: 1})
        futures, expected_sha = {}, {}
        for sid, nb in sorted(todo.items()):
            data = nb.read_bytes()
            expected_sha[sid] = hashlib.sha256(data).hexdigest()
            key = f"qcourse-grade-{lab}-{sid}-{expected_sha[sid][:16]}"
            futures[client.submit(grade_submission, lab, sid, data, bundle_task, timeout, key=key,
                                  resources={resource: 1})] = sid
        # the course gradebook must know the lab before the first outcome is kept: prepared while
        # the workers start on the first submissions, not before
        prepare_assignment(lab, course_root, course_root)
        with client.as_current():  # distributed.wait looks for the current client
            _grade_until_done(client, distributed, futures, expected_sha, resource, lab, course_root, outcomes,
                              log, wait_for_workers, address, tqdm)
    finally:
        try:
            client.close(timeout=5)
        except Exception:  # the scheduler is gone already: nothing left to close cleanly
            pass
    return outcomes


def _grade_until_done(client, distributed, futures, expected_sha, resource, lab, course_root, outcomes,
                      log, wait_for_workers, address, tqdm) -> None:
    recorded: set[tuple[str, str]] = set()  # (student, sha256): a result is kept once, whatever ran twice
    per_worker = defaultdict(lambda: [0, 0.0])
    pending, said, idle_since = set(futures), set(), time.monotonic()
    bar = tqdm(total=len(futures), desc=f"{lab} on {address}", unit="submission", file=sys.stderr,
               disable=None, dynamic_ncols=True)
    emit = bar.write if log is print and not bar.disable else log
    try:
        while pending:
            try:
                done, pending = distributed.wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
            except distributed.TimeoutError:
                done = set()
            except Exception as e:  # the client lost its scheduler while waiting
                raise _gone(address, e, len(recorded), len(futures))
            for future in done:
                sid = futures[future]
                try:
                    result = future.result()
                except distributed.KilledWorker as e:  # died more often than the scheduler allows
                    outcomes[sid] = _lost_outcome(sid, expected_sha[sid], e)
                    emit(f"  {sid}: {outcomes[sid].message}")
                    bar.update()
                    continue
                except Exception as e:  # cancelled: the scheduler went away with the task
                    raise _gone(address, e, len(recorded), len(futures))
                outcome = Outcome(**result["outcome"])
                if (outcome.student, outcome.sha256) in recorded:  # cannot happen with one key a task; kept cheap
                    continue
                recorded.add((outcome.student, outcome.sha256))
                keep(outcome, result["files"], lab, course_root, emit)
                outcomes[sid] = outcome
                per_worker[outcome.worker][0] += 1
                per_worker[outcome.worker][1] += outcome.seconds
                bar.update()
            if client.status not in ("running", "connecting"):
                raise _gone(address, None, len(recorded), len(futures))
            idle_since = _watch_graders(client, resource, pending, said, idle_since, wait_for_workers, emit)
    finally:
        bar.close()
        for worker, (count, seconds) in sorted(per_worker.items()):
            log(f"  worker {worker}: {count} submissions, {seconds:.1f} s grading")


def _watch_graders(client, resource, pending, said, idle_since, wait_for_workers, emit) -> float:
    """Stop when no worker can grade for ``wait_for_workers`` s; returns when the last one was seen."""
    if not pending:
        return idle_since
    try:
        graders = _graders(client, resource)
    except Exception:  # the scheduler did not answer: the next wait tells whether it is gone
        return idle_since
    _say_unfit(_unfit(client, resource), said, emit)
    if graders:
        return time.monotonic()
    if time.monotonic() - idle_since > wait_for_workers:
        unfit = _unfit(client, resource)
        why = "; ".join(f"{w}: {', '.join(p)}" for w, p in unfit.items()) or "no worker is connected"
        raise ClusterError(f"no worker able to grade for {wait_for_workers:g} s ({why}); {len(pending)} submissions "
                           "not graded. Start workers in the course's environment (docs/cluster-grading.md) "
                           "and run the same command again: what was graded is kept")
    return idle_since


def _gone(address: str, error: BaseException | None, kept: int, total: int) -> ClusterError:
    why = f" ({type(error).__name__}: {str(error)[:200]})" if error is not None else ""
    return ClusterError(f"the Dask scheduler at {address} went away{why}: {kept} of {total} submissions were "
                        f"graded and recorded; run the same command again to grade the other {total - kept}")
