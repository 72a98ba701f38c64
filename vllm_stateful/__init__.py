"""vllm-stateful: stateful sessions for vLLM.

Importing this package has no side effects; vLLM loads the plugin through its
entry points (``vllm.general_plugins`` and ``vllm.endpoint_plugins``) and the
scheduler through ``--scheduler-cls vllm_stateful.StatefulScheduler``.
"""

__version__ = "0.1.0"

# The scheduler is imported lazily so that `import vllm_stateful` stays cheap
# and does not import vLLM.
SCHEDULER_CLS = "vllm_stateful.engine.scheduler.StatefulScheduler"


def __getattr__(name: str):
    if name == "StatefulScheduler":
        from vllm_stateful.engine.scheduler import StatefulScheduler

        return StatefulScheduler
    raise AttributeError(name)
