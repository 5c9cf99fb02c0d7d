"""The queue's Lua scripts: every multi-key change happens atomically inside Redis.

Each script touches the keys of one shard only (one hash tag, so one Cluster slot), except
``FETCH``, which reads several streams in priority order in one round trip on a standalone or
Sentinel server. Scripts run by ``EVALSHA`` and fall back to ``EVAL`` after a restart emptied
the script cache. They stick to commands and replies that Redis 6.2 and 7.x share; the places
where the versions differ (``XCLAIM`` of a deleted entry, ``XINFO GROUPS`` lag) are handled in
the script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

ScriptArg = bytes | str | int | float

_HELPERS = """
-- The non-empty pieces of s between one-character separators sep. A plain search (memchr)
-- rather than gmatch over a class pattern such as '[^,]+', which tests the class at every
-- character: that cost the ACK script ~2 us per acknowledged job, half its time.
local function split(s, sep)
  local out, n, pos, len = {}, 0, 1, #s
  while pos <= len do
    local e = string.find(s, sep, pos, true) or len + 1
    if e > pos then
      n = n + 1
      out[n] = string.sub(s, pos, e - 1)
    end
    pos = e + 1
  end
  return out
end
local function field(f, name)
  for k = 1, #f, 2 do
    if f[k] == name then return f[k + 1] end
  end
  return nil
end
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function group_info(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups.err then return nil end
  for _, g in ipairs(groups) do
    local info = {}
    for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
    if info['name'] == group then return info end
  end
  return nil
end
"""


def execute_command(redis: Redis) -> Callable[..., Awaitable[Any]]:
    """``redis.execute_command``, typed (redis-py leaves it untyped)."""
    return cast("Callable[..., Awaitable[Any]]", redis.execute_command)


class Script:
    """A Lua script run by SHA, re-sent whole when the server does not know it yet."""

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = (_HELPERS + body).encode()
        self.sha = hashlib.sha1(self.body).hexdigest()

    async def __call__(self, redis: Redis, keys: Sequence[bytes], args: Sequence[ScriptArg]) -> Any:
        execute = execute_command(redis)
        try:
            return await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await execute("EVAL", self.body, len(keys), *keys, *args)


# KEYS: stream index count delayed delayed_payload delayed_meta [dedup markers…]
# ARGV: group now_ms cap maxlen dedup_ttl_s n, then joined per-job columns: job ids
#       (newline-joined), dedup marker KEYS index (0 = none), delay ms and payload lengths
#       (comma-joined), and the payloads concatenated. Packing columns keeps the client from
#       encoding four arguments per job.
# Reply: flat [status, job id] per job; status 0 added, 1 duplicate (first job's id), 2 full.
ENQUEUE = Script(
    "enqueue",
    """
local stream, index, count, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, now, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local maxlen, ttl, n = ARGV[4], ARGV[5], tonumber(ARGV[6])
local ids, dks = split(ARGV[7], '\\n'), split(ARGV[8], ',')
local delays, lens, blob = split(ARGV[9], ','), split(ARGV[10], ','), ARGV[11]
local pending = 0
local p = redis.pcall('XPENDING', stream, group)
if p.err then
  -- the group is created here too, at id 0, so nothing enqueued before a consumer starts is skipped
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
else
  pending = tonumber(p[1])
end
local backlog = tonumber(redis.call('GET', count) or '0') - pending + redis.call('ZCARD', delayed)
local out, added, pos = {}, 0, 1
for j = 1, n do
  local id, dk, delay = ids[j], tonumber(dks[j]), tonumber(delays[j])
  local len = tonumber(lens[j])
  local payload = string.sub(blob, pos, pos + len - 1)
  pos = pos + len
  local prev = nil
  if dk > 0 then prev = redis.call('GET', KEYS[dk]) end
  if not prev then
    local loc = redis.call('HGET', index, id)
    if loc and (loc == 'd' or string.sub(loc, 1, 2) == 's:') then prev = id end
  end
  if prev then
    out[#out + 1] = 1
    out[#out + 1] = prev
  elseif backlog >= cap then
    out[#out + 1] = 2
    out[#out + 1] = id
  else
    if delay > 0 then
      redis.call('ZADD', delayed, now + delay, id)
      redis.call('HSET', KEYS[5], id, payload)
      redis.call('HSET', KEYS[6], id, '0:' .. ARGV[2] .. ':')
      redis.call('HSET', index, id, 'd')
    else
      local eid = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'i', id, 'p', payload)
      redis.call('HSET', index, id, 's:' .. eid)
      added = added + 1
    end
    if dk > 0 then redis.call('SET', KEYS[dk], id, 'EX', ttl) end
    backlog = backlog + 1
    out[#out + 1] = 0
    out[#out + 1] = id
  end
end
if added > 0 then redis.call('INCRBY', count, added) end
return out
""",
)

# KEYS: streams in priority order. ARGV: group consumer count.
# Reply: flat [stream position (1-based), entries] for each stream that had entries.
FETCH = Script(
    "fetch",
    """
local group, me, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  if want <= 0 then break end
  local r = redis.pcall('XREADGROUP', 'GROUP', group, me, 'COUNT', want, 'STREAMS', KEYS[i], '>')
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP', 1, true) then return redis.error_reply(r.err) end
    -- Redis came back empty (or the stream was never written): recreate and read again
    redis.call('XGROUP', 'CREATE', KEYS[i], group, '0', 'MKSTREAM')
    r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want, 'STREAMS', KEYS[i], '>')
  end
  if r then
    local entries = r[1][2]
    out[#out + 1] = i
    out[#out + 1] = entries
    want = want - #entries
  end
end
return out
""",
)

# KEYS: stream index count completed throughput_bucket
# ARGV: group keep ttl_s entry_ids (comma-joined) job_ids (newline-joined) summaries
#       (newline-joined JSON, which never contains a raw newline; ``w`` is the wait in ms)
#       total_wait_ms
# Only entries this call acknowledged are logged, so a job is never completed twice. One XACK
# takes the whole batch: when it acknowledges every id (the common case) each one was pending
# until now. When it acknowledges fewer, some were acknowledged first by another call (a
# takeover race): every script that acknowledges an entry also removes it from the stream, so
# the ones still there are this call's; an entry deleted while it was pending is left to
# LOCATE, which repairs its index and counter as for any lost entry.
ACK = Script(
    "ack",
    """
local group, keep, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local eids = split(ARGV[4], ',')
local n = #eids
local acked, waited, jids, logs, partial = 0, tonumber(ARGV[7]), nil, nil, false
for s = 1, n, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(eids, s, math.min(s + 999, n)))
end
if acked == n then
  jids, logs = split(ARGV[5], '\\n'), split(ARGV[6], '\\n')
elseif acked > 0 then
  -- Ours: still in the stream and delivered by this group (at or below its last-delivered
  -- id: after a failover to a lagging replica the stream may hold entries the group never
  -- delivered, which are not ours to count or remove).
  local info = group_info(KEYS[1], group)
  local last = info and info['last-delivered-id'] or '0-0'
  local all_jids, all_logs = split(ARGV[5], '\\n'), split(ARGV[6], '\\n')
  local mine = {}
  partial = true
  jids, logs, waited = {}, {}, 0
  for i = 1, n do
    if not id_lt(last, eids[i]) and #redis.call('XRANGE', KEYS[1], eids[i], eids[i]) > 0 then
      mine[#mine + 1] = eids[i]
      jids[#jids + 1] = all_jids[i]
      logs[#logs + 1] = all_logs[i]
      waited = waited + cjson.decode(all_logs[i])['w']
    end
  end
  eids, acked = mine, #mine
end
if acked > 0 then
  -- XACK said these entries were live, so the index still points at them (enqueue never
  -- indexes a second live entry for one job id)
  for s = 1, acked, 1000 do
    redis.call('HDEL', KEYS[2], unpack(jids, s, math.min(s + 999, acked)))
  end
  -- Acknowledged entries leave the stream at once: it then holds only waiting and pending
  -- work, so no length-based trim (XADD MAXLEN ~) can ever reach an entry still running.
  -- Entries older than every pending one are all acknowledged (reads deliver in stream
  -- order): one exact XTRIM MINID removes them a node at a time; the rest (handlers that
  -- finished out of order) go by XDEL, which costs a search per entry.
  local p = redis.call('XPENDING', KEYS[1], group)
  if partial then
    -- Another call acknowledged part of the batch first (or the stream lags behind this
    -- consumer): no trim by position, only this call's own entries go, by id.
    for s = 1, acked, 1000 do
      redis.call('XDEL', KEYS[1], unpack(eids, s, math.min(s + 999, acked)))
    end
  elseif tonumber(p[1]) == 0 then
    -- nothing pending: everything up to the newest entry acknowledged here is done
    local top = {0, 0}
    for i = 1, acked do
      local ms, seq = string.match(eids[i], '^(%d+)-(%d+)$')
      ms, seq = tonumber(ms), tonumber(seq)
      if ms > top[1] or (ms == top[1] and seq > top[2]) then top = {ms, seq} end
    end
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', top[1], top[2] + 1))
  elseif redis.call('XTRIM', KEYS[1], 'MINID', p[2]) < acked then
    -- Below the oldest pending entry the stream held only what this call acknowledged (every
    -- earlier acknowledgement removed its entries), so trimming fewer than that means some
    -- finished ahead of an older entry: those are removed by id.
    local bms, bseq = string.match(p[2], '^(%d+)-(%d+)$')
    bms, bseq = tonumber(bms), tonumber(bseq)
    local rest = {}
    for i = 1, acked do
      local ms, seq = string.match(eids[i], '^(%d+)-(%d+)$')
      ms, seq = tonumber(ms), tonumber(seq)
      if ms > bms or (ms == bms and seq > bseq) then rest[#rest + 1] = eids[i] end
    end
    for s = 1, #rest, 1000 do
      redis.call('XDEL', KEYS[1], unpack(rest, s, math.min(s + 999, #rest)))
    end
  end
  redis.call('DECRBY', KEYS[3], acked)
  if keep > 0 then
    for s = 1, acked, 1000 do
      redis.call('LPUSH', KEYS[4], unpack(logs, s, math.min(s + 999, acked)))
    end
    redis.call('LTRIM', KEYS[4], 0, keep - 1)
  end
  redis.call('HINCRBY', KEYS[5], 'n', acked)
  redis.call('HINCRBY', KEYS[5], 'w', waited)
  redis.call('EXPIRE', KEYS[5], ttl)
end
return acked
""",
)

# KEYS: stream index count delayed delayed_payload delayed_meta
# ARGV: group entry_id job_id due_ms payload attempts first_ms error
RETRY = Script(
    "retry",
    """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DECR', KEYS[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[5])
redis.call('HSET', KEYS[6], ARGV[3], ARGV[6] .. ':' .. ARGV[7] .. ':' .. ARGV[8])
redis.call('HSET', KEYS[2], ARGV[3], 'd')
return 1
""",
)

# KEYS: stream index count dead
# ARGV: group entry_id job_id payload attempts first_ms error
# Reply: the dead-letter entry id, or nil when the entry was already acknowledged elsewhere.
DEAD = Script(
    "dead",
    """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DECR', KEYS[3])
local did = redis.call('XADD', KEYS[4], '*', 'i', ARGV[3], 'p', ARGV[4], 'a', ARGV[5],
  't', ARGV[6], 'e', ARGV[7], 's', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], 'x:' .. did)
return did
""",
)

# KEYS: stream count. ARGV: group consumer min_idle_ms count owner ('' = any consumer)
# Reply: {{{entry_id, fields, deliveries}…}, {lost entry ids…}}.
# Idle entries of any consumer are found and taken with XAUTOCLAIM (JUSTID, following its
# cursor); a restarting consumer's own entries with XPENDING … consumer. Each taken entry is
# then XCLAIMed once more to read it and count the delivery, and XPENDING gives the count that
# XAUTOCLAIM's reply lacks. Entries deleted while pending differ by version: 7.x lists them in
# XAUTOCLAIM's third reply element (already dropped from the PEL), 6.2 returns them as ids whose
# XCLAIM yields nil; either way they are acknowledged and reported lost (the reconciler
# re-enqueues their runs from PostgreSQL).
CLAIM = Script(
    "claim",
    """
local group, me, idle, n, owner = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local ids, lost = {}, {}
if owner == '' then
  local cursor = '0-0'
  repeat
    local r = redis.pcall('XAUTOCLAIM', KEYS[1], group, me, idle, cursor, 'COUNT', n - #ids,
      'JUSTID')
    if r.err then
      if not string.find(r.err, 'NOGROUP', 1, true) then return redis.error_reply(r.err) end
      redis.call('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
      return {{}, {}}
    end
    cursor = r[1]
    for _, id in ipairs(r[2]) do ids[#ids + 1] = id end
    if r[3] then
      for _, id in ipairs(r[3]) do
        redis.call('DECR', KEYS[2])
        lost[#lost + 1] = id
      end
    end
  until cursor == '0-0' or #ids >= n
else
  local p = redis.pcall('XPENDING', KEYS[1], group, 'IDLE', idle, '-', '+', n, owner)
  if p.err then
    if not string.find(p.err, 'NOGROUP', 1, true) then return redis.error_reply(p.err) end
    redis.call('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
    return {{}, {}}
  end
  for _, e in ipairs(p) do ids[#ids + 1] = e[1] end
end
local claimed = {}
for _, id in ipairs(ids) do
  local c = redis.call('XCLAIM', KEYS[1], group, me, 0, id)
  if c[1] then
    local pe = redis.call('XPENDING', KEYS[1], group, id, id, 1)
    claimed[#claimed + 1] = {c[1][1], c[1][2], pe[1][4]}
  else
    redis.call('XACK', KEYS[1], group, id)
    redis.call('DECR', KEYS[2])
    lost[#lost + 1] = id
  end
end
return {claimed, lost}
""",
)

# KEYS: stream. ARGV: group consumer entry_ids…
# Resets the idle time of entries this consumer still owns; replies with the ones it lost.
TOUCH = Script(
    "touch",
    """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
""",
)

# KEYS: stream index count delayed delayed_payload delayed_meta. ARGV: now_ms limit maxlen
# Reply: {promoted, next due ms or nil}. Atomic, so whichever worker runs it first promotes
# each entry exactly once.
PROMOTE = Script(
    "promote",
    """
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local added = 0
for _, jid in ipairs(due) do
  local payload = redis.call('HGET', KEYS[5], jid)
  if payload then
    local a, t, e = string.match(redis.call('HGET', KEYS[6], jid) or '0::', '^(%d*):(%d*):(.*)$')
    local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'i', jid, 'p', payload}
    if a and a ~= '' and a ~= '0' then args[#args + 1] = 'a'; args[#args + 1] = a end
    if t and t ~= '' then args[#args + 1] = 't'; args[#args + 1] = t end
    if e and e ~= '' then args[#args + 1] = 'e'; args[#args + 1] = e end
    local eid = redis.call(unpack(args))
    redis.call('HSET', KEYS[2], jid, 's:' .. eid)
    added = added + 1
  elseif redis.call('HGET', KEYS[2], jid) == 'd' then
    redis.call('HDEL', KEYS[2], jid)
  end
  redis.call('ZREM', KEYS[4], jid)
  redis.call('HDEL', KEYS[5], jid)
  redis.call('HDEL', KEYS[6], jid)
end
if added > 0 then redis.call('INCRBY', KEYS[3], added) end
local nxt = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
return {added, nxt[2]}
""",
)

# KEYS: stream count. ARGV: group
# Trims acknowledged entries only: MINID is the oldest of (last delivered, oldest pending), so
# nothing undelivered or pending is ever cut. When nothing is waiting, the unacknowledged
# counter must equal the PEL size, which repairs any drift (e.g. entries deleted by hand).
TRIM = Script(
    "trim",
    """
local info = group_info(KEYS[1], ARGV[1])
if not info then return 0 end
local last = info['last-delivered-id']
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if not top[1] or not id_lt(last, top[1][1]) then
  redis.call('SET', KEYS[2], p[1])
end
if last == '0-0' then return 0 end
local minid = last
if tonumber(p[1]) > 0 and id_lt(p[2], minid) then minid = p[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
""",
)

_DROP_DEAD = """
local removed = 0
local function drop(entries)
  for _, e in ipairs(entries) do
    local jid = field(e[2], 'i')
    if jid and redis.call('HGET', KEYS[2], jid) == 'x:' .. e[1] then
      redis.call('HDEL', KEYS[2], jid)
    end
    redis.call('XDEL', KEYS[1], e[1])
    removed = removed + 1
  end
end
"""

# KEYS: dead index. ARGV: cutoff_ms max_count limit
# Dead letters leave by age and by count, with their index entries (a MAXLEN would orphan them).
EXPIRE_DEAD = Script(
    "expire_dead",
    _DROP_DEAD
    + """
local limit = tonumber(ARGV[3])
drop(redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[1] .. '-0', 'COUNT', limit))
local over = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then drop(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', math.min(over, limit))) end
return removed
""",
)

# KEYS: stream index count delayed. ARGV: group job_ids…
# Reply per id: '' (absent), 'd', 's:<entry id>' or 'x:<dead id>'. Stale index entries (their
# stream entry was cut) are repaired on the way, so the reconciler sees the truth.
LOCATE = Script(
    "locate",
    """
local out = {}
for i = 2, #ARGV do
  local jid = ARGV[i]
  local loc = redis.call('HGET', KEYS[2], jid)
  if not loc then
    out[#out + 1] = ''
  elseif loc == 'd' then
    if redis.call('ZSCORE', KEYS[4], jid) then
      out[#out + 1] = 'd'
    else
      redis.call('HDEL', KEYS[2], jid)
      out[#out + 1] = ''
    end
  elseif string.sub(loc, 1, 2) == 's:' then
    local eid = string.sub(loc, 3)
    if #redis.call('XRANGE', KEYS[1], eid, eid) > 0
       or #redis.call('XPENDING', KEYS[1], ARGV[1], eid, eid, 1) > 0 then
      -- still in the stream, or its entry is gone but a worker holds it: not lost
      out[#out + 1] = loc
    else
      redis.call('HDEL', KEYS[2], jid)
      redis.call('XACK', KEYS[1], ARGV[1], eid)
      redis.call('DECR', KEYS[3])
      out[#out + 1] = ''
    end
  else
    out[#out + 1] = loc
  end
end
return out
""",
)

# KEYS: stream count delayed dead completed throughput_buckets…. ARGV: group
# Reply: {unacked, pending, delayed, dead, completed, consumers, lag (-1 = not reported),
#         first waiting entry id ('' = none), acked in buckets, wait ms in buckets}
STATS = Script(
    "stats",
    """
local pending, consumers, lag, last = 0, 0, -1, '0-0'
local info = group_info(KEYS[1], ARGV[1])
if info then
  pending, consumers, last = info['pending'], info['consumers'], info['last-delivered-id']
  if info['lag'] then lag = info['lag'] end
end
local r
if last == '0-0' then
  r = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
else
  r = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
end
local first = ''
if r[1] then first = r[1][1] end
local n, w = 0, 0
for i = 6, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'n', 'w')
  n = n + tonumber(v[1] or 0)
  w = w + tonumber(v[2] or 0)
end
return {tonumber(redis.call('GET', KEYS[2]) or '0'), pending, redis.call('ZCARD', KEYS[3]),
  redis.call('XLEN', KEYS[4]), redis.call('LLEN', KEYS[5]), consumers, lag, first, n, w}
""",
)

# KEYS: stream index count dead. ARGV: job_id maxlen. Reply: new entry id or nil.
RETRY_DEAD = Script(
    "retry_dead",
    """
local loc = redis.call('HGET', KEYS[2], ARGV[1])
if not loc or string.sub(loc, 1, 2) ~= 'x:' then return false end
local did = string.sub(loc, 3)
local r = redis.call('XRANGE', KEYS[4], did, did)
if not r[1] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return false
end
local f = r[1][2]
local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'i', ARGV[1], 'p', field(f, 'p') or ''}
local t = field(f, 't')
if t then args[#args + 1] = 't'; args[#args + 1] = t end
local eid = redis.call(unpack(args))
redis.call('XDEL', KEYS[4], did)
redis.call('HSET', KEYS[2], ARGV[1], 's:' .. eid)
redis.call('INCR', KEYS[3])
return eid
""",
)

# KEYS: stream index count delayed delayed_payload delayed_meta dead. ARGV: group job_id
# Reply: '' (absent), 'stream', 'delayed' or 'dead'.
DELETE = Script(
    "delete",
    """
local loc = redis.call('HGET', KEYS[2], ARGV[2])
if not loc then return '' end
redis.call('HDEL', KEYS[2], ARGV[2])
if loc == 'd' then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
  redis.call('HDEL', KEYS[6], ARGV[2])
  return 'delayed'
end
local id = string.sub(loc, 3)
if string.sub(loc, 1, 1) == 's' then
  redis.call('XACK', KEYS[1], ARGV[1], id)
  if redis.call('XDEL', KEYS[1], id) == 1 then redis.call('DECR', KEYS[3]) end
  return 'stream'
end
redis.call('XDEL', KEYS[7], id)
return 'dead'
""",
)

# KEYS: stream index count. ARGV: group cutoff_ms limit. Deletes waiting entries older than
# the cutoff (never pending ones: they are someone's work in progress).
CLEAN_WAITING = Script(
    "clean_waiting",
    """
local info = group_info(KEYS[1], ARGV[1])
local start = '-'
if info and info['last-delivered-id'] ~= '0-0' then start = '(' .. info['last-delivered-id'] end
local r = redis.call('XRANGE', KEYS[1], start, '(' .. ARGV[2] .. '-0', 'COUNT', ARGV[3])
for _, e in ipairs(r) do
  local jid = field(e[2], 'i')
  if jid and redis.call('HGET', KEYS[2], jid) == 's:' .. e[1] then
    redis.call('HDEL', KEYS[2], jid)
  end
  redis.call('XDEL', KEYS[1], e[1])
end
if #r > 0 then redis.call('DECRBY', KEYS[3], #r) end
return #r
""",
)

# KEYS: dead index. ARGV: cutoff_ms limit
CLEAN_DEAD = Script(
    "clean_dead",
    _DROP_DEAD
    + """
drop(redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[1] .. '-0', 'COUNT', ARGV[2]))
return removed
""",
)

# KEYS: delayed delayed_payload delayed_meta index. ARGV: cutoff_ms limit
# Delayed jobs first enqueued before the cutoff.
CLEAN_DELAYED = Script(
    "clean_delayed",
    """
local removed = 0
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, jid in ipairs(ids) do
  if removed >= tonumber(ARGV[2]) then break end
  local meta = redis.call('HGET', KEYS[3], jid) or '0:0:'
  local _, t = string.match(meta, '^(%d*):(%d*):')
  if tonumber(t or '0') and tonumber(t or '0') < tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], jid)
    redis.call('HDEL', KEYS[2], jid)
    redis.call('HDEL', KEYS[3], jid)
    if redis.call('HGET', KEYS[4], jid) == 'd' then redis.call('HDEL', KEYS[4], jid) end
    removed = removed + 1
  end
end
return removed
""",
)

# KEYS: completed. ARGV: cutoff_ms. Completed summaries are newest first: pop from the tail.
CLEAN_COMPLETED = Script(
    "clean_completed",
    """
local removed = 0
while true do
  local last = redis.call('LINDEX', KEYS[1], -1)
  if not last then break end
  local ok, doc = pcall(cjson.decode, last)
  if ok and doc['f'] and doc['f'] >= tonumber(ARGV[1]) then break end
  redis.call('RPOP', KEYS[1])
  removed = removed + 1
end
return removed
""",
)

# KEYS: stream index count. ARGV: group consumer entry_ids…
# Hands entries this consumer still holds back to the queue at shutdown: each is acknowledged,
# deleted and added again at the stream's tail with its deliveries counted into ``a`` (the
# next delivery is not a first one, so the engine resumes from the checkpoints), where any
# live consumer's blocking read picks it up at once. Entries it no longer owns are skipped.
RELEASE = Script(
    "release",
    """
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    if e[1] then
      local f, args = e[1][2], {'XADD', KEYS[1], '*'}
      local a, t, jid = 0, string.match(id, '^(%d+)'), nil
      for j = 1, #f, 2 do
        if f[j] == 'a' then a = tonumber(f[j + 1]) or 0
        elseif f[j] == 't' then t = f[j + 1]
        else
          if f[j] == 'i' then jid = f[j + 1] end
          args[#args + 1] = f[j]
          args[#args + 1] = f[j + 1]
        end
      end
      args[#args + 1] = 'a'
      args[#args + 1] = a + tonumber(p[1][4])
      args[#args + 1] = 't'
      args[#args + 1] = t
      local eid = redis.call(unpack(args))
      if jid then redis.call('HSET', KEYS[2], jid, 's:' .. eid) end
      n = n + 1
    else
      redis.call('DECR', KEYS[3])
    end
  end
end
return n
""",
)

# KEYS: lease. ARGV: token ttl_ms. Extends a lease (a consumer name, the scheduler's
# leadership) only for its holder: 1 when extended.
RENEW_LEASE = Script(
    "renew_lease",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""",
)

# KEYS: lease. ARGV: token. Drops a lease only for its holder.
DROP_LEASE = Script(
    "drop_lease",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)
