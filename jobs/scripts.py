"""Checked writes in one round trip: Lua scripts on the job store that read, check and write atomically, with the
commands to write recorded from a pipeline that is never sent.

A compare-and-set with WATCH costs three round trips (WATCH, the read, MULTI/EXEC) per job; a
script reads, checks and writes in one, atomically (Redis runs nothing else meanwhile), for a
whole batch of jobs at once. What to write stays the code that knows it: ``recorded`` runs it
against a pipeline that is never sent (in the rq adapter, rq's own functions:
``Job.prepare_for_execution``, ``Execution.create``, ``Result.create``, ``Queue.enqueue_job``
...), and hands its commands to the script as arguments: ``<n> <arg 1> ... <arg n>`` per
command (``commands``). A
refusal of the store inside a script comes back as the error a command would have raised (a
script's first write refused, out of memory or on a read-only replica, writes nothing; Redis
6 wraps the refusal in its script error, ``refusal`` unwraps it), so the callers see
``jobs.queues.STORE_UNAVAILABLE`` as for any command. A script runs its checked writes after
its reads, the first write being the one an ACL is likeliest to refuse.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis
from redis._parsers.base import BaseParser
from redis.client import Pipeline
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

# The Lua helper every script starts with: run(argv, i, j) runs the commands encoded in
# argv[i..j] (each: its argument count, then its arguments).
RUN = """
local function run(argv, i, j)
  while i <= j do
    local n = tonumber(argv[i])
    redis.call(unpack(argv, i + 1, i + n))
    i = i + n + 1
  end
end
"""

# The Lua helper of a script whose recorded commands carry stand-ins: run_replacing(argv, i,
# j, swaps) runs the commands encoded in argv[i..j] as ``run`` does, in each argument every
# stand-in swaps[k][1] replaced by swaps[k][2] (stand-ins of letters and digits only: nothing
# special to Lua's gsub); returns the first command's reply (nil when there is none). An
# argument is searched for each stand-in as plain text first: most hold none, and a gsub
# makes a new string of every argument (a take's claim: 44 arguments and 3 stand-ins a job;
# Redis's time in scripts per classify at 8 clients 305 -> 238 us, INFO commandstats).
RUN_REPLACING = """
local function run_replacing(argv, i, j, swaps)
  local first = nil
  while i <= j do
    local n = tonumber(argv[i])
    local command = {}
    for k = 1, n do
      local arg = argv[i + k]
      for _, swap in ipairs(swaps) do
        if string.find(arg, swap[1], 1, true) then arg = (arg:gsub(swap[1], swap[2])) end
      end
      command[k] = arg
    end
    local reply = redis.call(unpack(command))
    if first == nil then first = reply end
    i = i + n + 1
  end
  return first
end
"""

# The Lua helper every script that stamps a time starts with: utc_now() gives Redis's clock
# (TIME) as the UTC year, month, day, hour, minute, second and microsecond; the date from the
# days since 1970 (Howard Hinnant's civil_from_days). Calling TIME before a script's writes
# is allowed: Redis replicates a script's effects, not the script.
UTC_NOW = """
local function utc_now()
  local t = redis.call('TIME')
  local sec, usec = tonumber(t[1]), tonumber(t[2])
  local days = math.floor(sec / 86400)
  local rest = sec - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return year, month, day, math.floor(rest / 3600), math.floor(rest % 3600 / 60), rest % 60, usec
end
"""


def recorded(conn: Redis, fill: Callable[[Pipeline], None]) -> list[bytes]:
    """The commands ``fill(pipe)`` adds to a transaction on ``conn`` (sent nowhere), encoded
    for a script (``commands``)."""
    pipe = conn.pipeline(transaction=True)
    pipe.multi()  # explicit from the start: code that opens the transaction itself (rq's enqueue) skips it
    try:
        fill(pipe)
        return commands(conn, [args for args, _options in pipe.command_stack])
    finally:
        pipe.reset()


def commands(conn: Redis, stack: Sequence[Sequence]) -> list[bytes]:
    """Commands (each a sequence: its name, then its arguments) as a script's arguments."""
    encode = conn.get_encoder().encode
    out: list[bytes] = []
    for args in stack:
        out.append(str(len(args)).encode())
        out.extend(encode(a) for a in args)
    return out


def framed(parts: Sequence[bytes | str | int]) -> list[bytes | str | int]:
    """``parts`` preceded by their count: a variable-length group of a script's arguments."""
    return [len(parts), *parts]


class Script:
    """A Lua script sent by its SHA-1 (EVALSHA), loaded once more when Redis does not know it
    (a restart, a flush)."""

    def __init__(self, source: str):
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()

    def __call__(self, conn: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            try:
                return conn.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                conn.script_load(self.source)
                return conn.evalsha(self.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            raise refusal(exc) from None


# Redis 6: "Error running script (...): @user_script:1: @user_script: 1: -OOM command not allowed ..."
WRAPPED = re.compile(r"@user_script: ?\d+: -([A-Z]+) (.*)$", re.S)
# An ACL refusal inside a script (Redis 6 and 7 alike) names no error code.
ACL_REFUSALS = ("can't run this command", "can't access at least one of the keys")


def refusal(exc: ResponseError) -> ResponseError:
    """The error a command refused inside a script raises as a command of its own: the class
    redis-py gives its code (OutOfMemoryError, ReadOnlyError, ...), NoPermissionError for an
    ACL refusal; ``exc`` itself for anything else."""
    if type(exc) is not ResponseError:
        return exc  # Redis 7 passes the code on: redis-py has already classed it
    text = str(exc)
    match = WRAPPED.search(text)
    if match:
        cls = BaseParser.EXCEPTION_CLASSES.get(match.group(1))
        if isinstance(cls, type) and issubclass(cls, ResponseError):
            return cls(match.group(2).strip())
    if any(phrase in text for phrase in ACL_REFUSALS):
        return NoPermissionError(f"the user may not run a command of this script ({text.split(' script:')[0]})")
    return exc
