"""How a replica ended, as supervision reads it: retryable or permanent, and in words.

Exit code 0 is success. Retryable, restarting the replica while ``supervision.maxRestarts``
lasts:
- OOMKilled, Evicted, Deleted (gone after being seen), Preempted, NodeLost and Shutdown;
- exit codes >= 128 (killed by a signal);
- the trainer's exit code 3 (``sgdjob.contract.EXIT_PEER``: a peer stopped answering, e.g. a
  shard that is being restarted or is still Pending).

The other exit codes 1..127 are permanent (1 an error, 2 an invalid spec or contract) and fail
the job at once. The exit codes themselves are defined in ``sgdjob.contract``. A local
executor reports a process killed by signal N (``Popen.returncode == -N``) as exit code
128 + N, as a container runtime does, so both executors classify alike (a negative code is
also taken as a signal).
"""

from __future__ import annotations

from sgdjob.contract import EXIT_MEANINGS, RETRYABLE_EXIT_CODES

# Reasons that mean "the machine or the platform took it away", not "the program is wrong".
RETRYABLE_REASONS = frozenset(
    {"OOMKilled", "Evicted", "Deleted", "Preempted", "NodeLost", "Shutdown", "Terminated"}
)
SIGNAL_EXIT_BASE = 128


def is_retryable(exit_code: int | None, reason: str) -> bool:
    """Signals, platform kills and "a peer stopped answering" are retryable; other exits not."""
    if reason in RETRYABLE_REASONS or exit_code in RETRYABLE_EXIT_CODES:
        return True
    if exit_code is None:
        # Failed without a container exit code: the node or the kubelet lost it.
        return True
    # Negative: a Popen returncode for a signal, in case an executor passes it unconverted.
    return exit_code < 0 or exit_code >= SIGNAL_EXIT_BASE


def describe_exit(exit_code: int | None, reason: str) -> str:
    """An exit in a message: "exit code 3: <its meaning>, Evicted"."""
    parts = []
    if exit_code is not None:
        meaning = EXIT_MEANINGS.get(exit_code) if exit_code else None
        parts.append(f"exit code {exit_code}" + (f": {meaning}" if meaning else ""))
    if reason:
        parts.append(reason)
    return ", ".join(parts) or "no exit code"
