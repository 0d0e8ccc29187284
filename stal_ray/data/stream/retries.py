"""How often Ray runs a stage's work again after a worker process or a whole node is lost (a spot instance
reclaimed, a host rebooted), and the error when that runs out: the streams' read and decoding tasks
(pipeline.py; the training stream's error raised in batches.py), evaluation's feature actors
(evaluate/features.py), pose estimation's read tasks and model actors (pose/annotate.py).

A task on a lost node, or one whose output block was in the lost node's object store, runs again on another
node; an actor is started again elsewhere and its unfinished call runs again there. Ray keeps each call's
outputs by their number in the call, so a call run again delivers nothing twice (docs/faults.md has the
measured runs). Ray Data's defaults retry without end (tasks max_retries=-1, actors max_restarts=-1 and
max_task_retries=-1): work that takes its node down every time would loop for ever. These bounds are what the
stages rely on; an exception raised by our own code is not retried by them.

They reach map_batches as its **ray_remote_args, which Ray 2.60 warns are deprecated (to go in 2.64) while it
has no named parameter for retries yet: where it gains them, they move there.
"""

import ray.exceptions

TASK_RETRIES = 3  # reruns of one task after its worker or node died, or its output was lost with a node
ACTOR_RESTARTS = 3  # restarts of one actor after its process or node died
# Reruns of one call: without end, bounded by the actor's restarts. Each attempt to reach an actor whose
# node just died counts as one ("the actor is temporarily unavailable"): with 3, a call spent them within a
# second, before Ray had restarted the actor elsewhere, and the stage failed (tests/test_multinode_stages.py)
ACTOR_TASK_RETRIES = -1

# What Ray raises once those ran out: the worker, the actor, the node or an object is gone for good
LOST = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayActorError,
        ray.exceptions.ObjectLostError)


class WorkLostError(RuntimeError):
    """A stage's work lost more often than Ray retries it; the message names what was lost."""


def task_options() -> dict:
    """Remote arguments of a Ray Data task stage (map_batches' ray_remote_args)."""
    return {"max_retries": TASK_RETRIES}


def actor_options() -> dict:
    """Remote arguments of a Ray Data actor pool (map_batches with an ActorPoolStrategy)."""
    return {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_TASK_RETRIES}


def work_lost(stage: str, lost: str, error: BaseException) -> WorkLostError:
    """The error of `stage` whose retries ran out: what was lost (`lost`, in words) and Ray's reason."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return WorkLostError(
        f"{stage}: Ray's retries ran out ({TASK_RETRIES} reruns per task, {ACTOR_RESTARTS} restarts per "
        f"actor) after workers or nodes were lost; {lost} "
        f"({type(error).__name__}: {reason})")
