"""sgdjob_operator: the Kopf operator that runs SGDJobs on Kubernetes.

Modules: ``manifests`` (children as dicts, pure), ``observe`` (pods -> observed replicas,
pure), ``status`` (the next status, pure), ``kube`` (a small API client), ``reconcile`` (one
pass of one job: the I/O), ``handlers`` (the Kopf wiring), ``metrics`` (the operator's
Prometheus metrics), ``entry`` (flags and start-up). Supervision decisions come from
``sgdjob.policy``, shared with the local executor. This package imports neither torch nor zmq,
and from sgdjob only ``api``, ``contract``, ``policy`` and ``curvekeys``.
"""
